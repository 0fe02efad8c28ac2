"""``split_batches``: turns cut, in order, into batches ``append_turns`` takes (at most
``MAX_BATCH_TURNS`` turns and ``MAX_BATCH_BYTES`` of payload, a single larger turn alone)."""

from __future__ import annotations

from pforge_async.turnstore import NewTurn
from pforge_async.turnstore.rules import MAX_BATCH_BYTES, MAX_BATCH_TURNS, split_batches


def turns(*sizes: int) -> list[NewTurn]:
    return [NewTurn(1, "t", b"x" * size) for size in sizes]


def test_nothing_is_one_empty_batch() -> None:
    assert split_batches([]) == [[]]


def test_cut_by_count_and_by_bytes_in_order() -> None:
    many = turns(*([1] * (MAX_BATCH_TURNS + 3)))
    batches = split_batches(many)
    assert [len(b) for b in batches] == [MAX_BATCH_TURNS, 3]
    assert [t for b in batches for t in b] == many

    half = MAX_BATCH_BYTES // 2
    big = turns(half, half, 1, MAX_BATCH_BYTES + 5, 2)
    batches = split_batches(big)
    # two halves fill a batch; the next byte starts another; a turn over the limit goes alone
    assert [[len(t.payload) for t in b] for b in batches] == [[half, half], [1], [MAX_BATCH_BYTES + 5], [2]]
    for batch in batches:
        assert len(batch) <= MAX_BATCH_TURNS
        assert len(batch) == 1 or sum(len(t.payload) for t in batch) <= MAX_BATCH_BYTES

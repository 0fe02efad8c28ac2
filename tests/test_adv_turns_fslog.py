"""The filesystem turn log when a write fails part way (a full disk, a file size limit): what the
log actor decided in memory for the failed batch was never on disk, so it must not be served nor
built on, and the store serves on once the write is undone. The write fails here through
``RLIMIT_FSIZE`` (writes past the limit get ``EFBIG``, the first of them cut short), in a child
process of its own so the limit touches nothing else."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.anyio

_CHILD = textwrap.dedent(
    """
    import resource, signal, sys, anyio
    from pforge_async import PforgeError, TurnNotFound
    from pforge_async.turnstore import FsTurnStore

    directory = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal

    async def main():
        store = FsTurnStore(directory)
        async with store:
            ctx = (await store.create_context()).context_id
            first = await store.append_turn(ctx, "t", b"first")
            size = (store.path).stat().st_size
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
            try:
                await store.append_turn(ctx, "t", b"x" * 4096)
            except PforgeError as exc:
                print("failed write:", type(exc).__name__)
            else:
                raise AssertionError("the write past the limit was acknowledged")
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            # Whatever the store answers now, what it acknowledges must be there after a reopen.
            acked = [first.turn_id]
            try:
                head = await store.get_head(ctx)
                print("head after the failure:", head.head_turn_id, "acknowledged:", acked)
                assert head.head_turn_id in acked, "the head moved to a turn that was never written"
                later = await store.append_turn(ctx, "t", b"later")
                acked.append(later.turn_id)
            except PforgeError as exc:  # the write was undone: the store serves on
                raise AssertionError(f"refused after the failure: {exc!r}") from exc
        # The same object opened again, then a new one: each replays the log alone (the object's
        # memory, which held what the failed write never wrote, is not kept).
        for reopened in (store, FsTurnStore(directory)):
            async with reopened:
                assert await reopened.check() == [], await reopened.check()
                chain = [t.turn_id for t in await reopened.list_turns(ctx)]
                assert chain == acked, (chain, acked)
                try:  # the turn of the failed write: never on disk, so not to be read nor forked
                    phantom = await reopened.get_turn(first.turn_id + 1)
                except TurnNotFound:
                    pass
                else:
                    assert phantom.turn_id in acked, f"turn {phantom.turn_id} was never written"
                acked.append((await reopened.append_turn(ctx, "t", b"again")).turn_id)
                assert await reopened.check() == []
        print("OK")

    anyio.run(main)
    """
)


def test_a_failed_log_write_serves_and_builds_on_nothing_it_did_not_write(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "fs")], capture_output=True, text=True, timeout=120
    )
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0 and done.stdout.rstrip().endswith("OK")


_OPEN_CHILD = textwrap.dedent(
    """
    import os, resource, sys, anyio
    from pforge_async import StorageError
    from pforge_async.turnstore import FsTurnStore

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))  # /dev/zero read to its end
    directory, kind = sys.argv[1], sys.argv[2]
    os.makedirs(directory)
    log = os.path.join(directory, "turns.log")
    if kind == "fifo":
        os.mkfifo(log)
    else:
        os.symlink(kind, log)

    async def main():
        try:
            async with FsTurnStore(directory):
                pass
        except StorageError as exc:
            print("refused:", exc)
        else:
            raise AssertionError("opened a log that is not a regular file")

    anyio.run(main)
    """
)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/null"])
def test_a_log_that_is_not_a_regular_file_is_refused_at_open(tmp_path: Path, kind: str) -> None:
    """A FIFO made the open wait forever for a writer, a symlink to /dev/zero read without end and
    one to /dev/null failed with a raw OSError: each is refused as StorageError, promptly."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _OPEN_CHILD, str(tmp_path / "fs"), kind], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"opening a turn log that is {kind} did not return within 30 s") from None
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0 and "refused:" in done.stdout and "regular file" in done.stdout


# A frame's length has 31 bits. A write past it (a put_blob of 2 GiB and more, which nothing else
# bounds) was acknowledged, then its frame and every later one were unreadable at the next open; a
# gc wrote 1,024 live turns per record, so 1,024 turns of 2 MiB made a compacted log of the same
# kind. Writing 2 GiB takes minutes here, so these tests lower the frame's limit instead.


async def test_a_write_longer_than_a_frame_is_refused_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pforge_async import InvalidInput, NewTurn
    from pforge_async.turnstore import FsTurnStore, fs

    monkeypatch.setattr(fs, "_MAX_RECORD", 64 << 10)
    async with FsTurnStore(tmp_path / "fs") as store:
        ctx = (await store.create_context()).context_id
        before = await store.append_turn(ctx, "t", b"before")
        with pytest.raises(InvalidInput):
            await store.put_blob(bytes(100 << 10))
        with pytest.raises(InvalidInput):
            await store.append_turns([NewTurn(ctx, "t", bytes(40 << 10)) for _ in range(2)])
        assert (await store.get_head(ctx)).head_turn_id == before.turn_id  # nothing of it loaded
        after = await store.append_turn(ctx, "t", b"after")
    async with FsTurnStore(tmp_path / "fs") as store:
        assert await store.check() == []
        assert [t.turn_id for t in await store.list_turns(ctx)] == [before.turn_id, after.turn_id]


async def test_a_compaction_writes_no_record_longer_than_a_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pforge_async.turnstore import FsTurnStore, fs

    monkeypatch.setattr(fs, "_MAX_RECORD", 64 << 10)
    async with FsTurnStore(tmp_path / "fs") as store:
        ctx = (await store.create_context()).context_id
        written = [(await store.append_turn(ctx, "t", bytes([i]) * (4 << 10))).turn_id for i in range(60)]
        report = await store.gc(grace_s=0)  # 240 KiB of live payload: more than a frame holds
        assert report.wal_truncated
    async with FsTurnStore(tmp_path / "fs") as store:
        assert await store.check() == []
        turns = await store.list_turns(ctx, limit=100)
        assert [t.turn_id for t in turns] == written
        assert [t.payload[:1] for t in turns] == [bytes([i]) for i in range(60)]

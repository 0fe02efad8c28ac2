"""``record_key`` (the recorder's per-hook key, built from cached parts) is exactly
``agent_key(session, seq, kind)``, also for names that push a key past the store's limit."""

from __future__ import annotations

import pytest

from pforge_async.agent.keys import kind_of, record_key
from pforge_async.turnstore.keys import agent_key

NAMES = ["a", "bench/a12", "a|b:c/s5:x|", "é" * 600, "\U0001f600" * 300, "x" * 990, "x" * 1010]
TYPES = ["pforge.agent.user_turn", "pforge.link.subagent_spawn", "custom.kind", "pforge.agent." + "k" * 60]


@pytest.mark.parametrize("name", NAMES)
def test_record_key_is_agent_key(name: str) -> None:
    for seq in (0, 1, 9, 10, 99, 12345, 2**63 - 1):
        for type_id in TYPES:
            for _ in range(2):  # the first call fills the caches, the second reads them
                assert record_key(name, seq, type_id) == agent_key(name, seq, kind_of(type_id))


def test_record_keys_differ_by_every_part() -> None:
    keys = {record_key(name, seq, type_id) for name in NAMES for seq in (0, 1, 10) for type_id in TYPES}
    assert len(keys) == len(NAMES) * 3 * len(TYPES)

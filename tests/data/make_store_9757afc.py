"""How ``store_9757afc.tar.gz`` was made: a store written by commit 9757afc (the release before store
manifests), for the tests that open an earlier version's store. Run against that commit's tree::

    git worktree add /tmp/oldmain 9757afc
    PYTHONPATH=/tmp/oldmain python tests/data/make_store_9757afc.py /tmp/old
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=2026-01-01 \
        -czf tests/data/store_9757afc.tar.gz -C /tmp/old .
"""

from __future__ import annotations

import sys

import anyio

from pforge_async import Usage, open_store


async def main(root: str) -> None:
    async with open_store(root, watch_workspaces=False) as store:
        ctx = await store.turns.create_context()
        first = await store.turns.append_turn(ctx.context_id, "user", b"hello from the old release")
        await store.turns.append_turn(ctx.context_id, "assistant", b"hi")
        fork = await store.turns.fork_context(first.turn_id)
        await store.turns.append_turn(fork.context_id, "assistant", b"a fork")
        await store.memory.record_transition("s", "a", "t", 0.5, True)
        await store.budget.set_budget("v", tokens=1000)
        held = await store.budget.reserve("v", tokens=100)
        await store.budget.commit(held, Usage(10, 20, 0))
        await store.nonces.consume(await store.nonces.issue("x", 60), "x")
        blob = await store.cas.write_blob(b"an old blob")
        tree = await store.cas.write_tree([("a.txt", "100644", blob)])
        commit = await store.cas.write_commit(tree, message="old", timestamp=1700000000, author="Old <old@example.com>")
        await store.cas.update_ref("refs/heads/main", commit)
        print(ctx.context_id, fork.context_id, blob, tree, commit)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])

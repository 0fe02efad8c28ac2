"""The main job: an orchestrator and its concurrent subagents on the embedded store in ./.pforge.

Every subagent forks the orchestrator's conversation (O(1)), and on each step reserves token budget,
"calls the model", commits what it used, appends its turns with deterministic idempotency keys,
spends a capability nonce on a tool call, learns in constellation memory, and snapshots its
workspace into the git-compatible CAS, attaching the tree to the turn. At the end the demo rebuilds
the whole tree of sessions from the store alone and checks everything it wrote.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import anyio

from pforge_async import Usage, agent_key, open_store

SUBAGENTS = 16
STEPS = 8
VENDOR = "demo-llm"
TOOLS = ["grep", "edit", "test"]


async def main() -> None:
    started = time.perf_counter()
    run_id = f"run-{os.getpid()}-{int(time.time())}"
    async with open_store(".pforge") as store:
        turns, cas = store.turns, store.cas
        await store.budget.set_budget(VENDOR, tokens=10**12, cost=10**12)
        session = await turns.create_context()
        task = await turns.append_turn(
            session.context_id,
            "pforge.agent.user_turn",
            b"Fix the failing tests in every package.",
            idempotency_key=agent_key(run_id, "orchestrator", "task"),
        )
        spawned: dict[int, int] = {}  # subagent -> its context
        rng = random.Random(7)

        async def subagent(n: int, workspace: Path) -> None:
            child = await turns.fork_context(task.turn_id)  # shares the task turn, copies nothing
            spawned[n] = child.context_id
            await turns.append_turn(
                session.context_id,
                "pforge.link.subagent_spawn",
                b'{"subagent": %d, "child_context_id": %d}' % (n, child.context_id),
                idempotency_key=agent_key(run_id, "spawn", n),
            )
            workspace.mkdir()
            for step in range(STEPS):
                held = await store.budget.reserve(VENDOR, tokens=4000, cost=20_000, model="demo")
                await anyio.sleep(rng.uniform(0, 0.005))  # the model "thinks"
                used = Usage(input_tokens=rng.randint(500, 2000), output_tokens=rng.randint(50, 1500), cost=9_000)
                await store.budget.commit(held, used)
                tool = TOOLS[(n + step) % len(TOOLS)]
                reply = await turns.append_turn(
                    child.context_id,
                    "pforge.agent.assistant_turn",
                    f"subagent {n} step {step}: calling {tool}".encode(),
                    idempotency_key=agent_key(run_id, n, step, "assistant"),
                )
                nonce = await store.nonces.issue(f"tool:{tool}:{n}", ttl_s=60)
                await store.nonces.consume(nonce, f"tool:{tool}:{n}")
                (workspace / f"step{step}.py").write_text(f"# {tool} by subagent {n}\nresult = {step}\n")
                tree = await cas.snapshot(workspace)
                result = await turns.append_turn(
                    child.context_id,
                    "pforge.agent.tool_results",
                    f"{tool} ok, tree {tree[:12]}".encode(),
                    idempotency_key=agent_key(run_id, n, step, "tool"),
                )
                await turns.attach_fs(result.turn_id, tree)
                await store.memory.record_transition(
                    f"step{step}",
                    tool,
                    f"step{step + 1}",
                    reward=rng.random(),
                    success=True,
                    idempotency_key=agent_key(run_id, n, step, "learn"),
                )
                assert reply.depth + 1 == result.depth

        with tempfile.TemporaryDirectory(prefix="pforge-demo-") as tmp:
            async with anyio.create_task_group() as tg:
                for n in range(SUBAGENTS):
                    tg.start_soon(subagent, n, Path(tmp) / f"agent{n}")
        elapsed = time.perf_counter() - started

        # Rebuild the tree of sessions from the store alone, and check it.
        links = [t for t in await turns.list_turns(session.context_id, limit=1000) if t.type_id.endswith("spawn")]
        assert len(links) == SUBAGENTS
        written = 0
        for n, context_id in spawned.items():
            history = await turns.list_turns(context_id, limit=1000)
            assert history[0].turn_id == task.turn_id and len(history) == 1 + 2 * STEPS, n
            assert all(t.fs_root for t in history if t.type_id.endswith("tool_results"))
            written += len(history) - 1
        last = history[-1]
        files = await cas.read_tree(last.fs_root or "", recursive=True)
        totals = await store.budget.totals(VENDOR)
        report = await cas.fsck()
        assert report.ok, report
        check = await store.check()
        assert check.ok, check.problems
        best = await store.memory.best_action("step3", TOOLS)
        turn_actor = store.turns._actor

        print(f"store: {store.root} (durability {store.durability})")
        print(f"{SUBAGENTS} subagents x {STEPS} steps in {elapsed:.2f} s, all concurrent on one event loop")
        print(
            f"turns: {written + len(links) + 1} appended ({turn_actor.commands} commands group-committed in "
            f"{turn_actor.batches} transactions, largest batch {turn_actor.largest_batch}); "
            f"{SUBAGENTS} forks of turn {task.turn_id}, nothing copied"
        )
        print(
            f"session tree rebuilt from the store: orchestrator context {session.context_id} -> "
            f"{len(links)} subagent contexts {sorted(spawned.values())[:4]}..."
        )
        print(
            f"budget {VENDOR}: {totals.tokens} tokens, {totals.cost / 1e6:.2f} units spent, "
            f"{totals.reserved_tokens} held"
        )
        print(f"nonces: {SUBAGENTS * STEPS} tool capabilities issued and each consumed exactly once")
        print(f"memory: best next tool at step3 by UCB1: {best}")
        print(f"cas: {report.checked} objects verified; last workspace tree {last.fs_root} holds {len(files)} files")
        print("store check (every object re-hashed, every database and invariant verified): ok")
        print(f"verify with git: git --git-dir {cas.path} fsck --strict --no-dangling; or: pforge check")


if __name__ == "__main__":
    anyio.run(main)

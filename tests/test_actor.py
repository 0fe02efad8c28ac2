from __future__ import annotations

import anyio
import anyio.lowlevel
import msgspec
import pytest

from pforge_async import ActorClosed, InvalidInput, open_store

from ._actors import Crash, Echo, RecordingActor, Reject, Sleep, running

pytestmark = pytest.mark.anyio


async def test_200_concurrent_callers_get_their_own_replies_in_order() -> None:
    actor = RecordingActor(mailbox_size=64, max_batch=64)
    replies: dict[int, list[tuple[int, int]]] = {}

    async def caller(n: int) -> None:
        got = replies.setdefault(n, [])
        for seq in range(5):
            got.append(tuple(await actor.call(Echo(caller=n, seq=seq))))

    async with running(actor):
        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(caller, n)

    for n in range(200):
        assert replies[n] == [(n, seq) for seq in range(5)]
    for n in range(200):
        assert [c.seq for c in actor.executed if isinstance(c, Echo) and c.caller == n] == list(range(5))
    assert actor.commands == 1000
    assert max(actor.batch_sizes) > 1
    assert actor.batches < 1000


async def test_mailbox_bounds_what_waits_and_drops_nothing() -> None:
    k = 4
    actor = RecordingActor(mailbox_size=k, max_batch=2, batch_delay=0.005)
    most_waiting = 0
    done = anyio.Event()

    async def monitor() -> None:
        nonlocal most_waiting
        while not done.is_set():
            most_waiting = max(most_waiting, actor.queued)
            await anyio.lowlevel.checkpoint()

    results: list[tuple[int, int]] = []

    async def caller(n: int) -> None:
        results.append(tuple(await actor.call(Echo(caller=n, seq=0))))

    async with running(actor):
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor)
            async with anyio.create_task_group() as callers:
                for n in range(60):
                    callers.start_soon(caller, n)
            done.set()

    assert most_waiting == k  # the mailbox filled up, and never beyond its size
    assert sorted(results) == [(n, 0) for n in range(60)]


async def _queue_behind_a_sleeper(actor: RecordingActor, *calls: object) -> list[object]:
    """Start a slow command, then queue ``calls`` so they land in one batch after it."""
    outcomes: list[object] = [None] * len(calls)

    async def one(i: int, call: object) -> None:
        try:
            if isinstance(call, bytes):
                outcomes[i] = await actor.call_raw(call)
            else:
                outcomes[i] = await actor.call(call)
        except Exception as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(actor.call, Sleep(seconds=0.05))
        await anyio.sleep(0.01)
        for i, call in enumerate(calls):
            tg.start_soon(one, i, call)
    return outcomes


async def test_a_failing_command_fails_only_its_caller() -> None:
    actor = RecordingActor()
    async with running(actor):
        outcomes = await _queue_behind_a_sleeper(
            actor, Echo(caller=1, seq=0), Reject(why="no such thing"), Echo(caller=2, seq=0)
        )
        assert actor.batch_sizes[-1] == 3  # all three really shared one batch
        assert outcomes[0] == (1, 0)
        assert isinstance(outcomes[1], InvalidInput)
        assert "no such thing" in str(outcomes[1])
        assert outcomes[2] == (2, 0)
        # the actor still serves
        assert await actor.call(Echo(caller=3, seq=1)) == (3, 1)


async def test_garbage_bytes_fail_only_their_sender() -> None:
    actor = RecordingActor()
    good = msgspec.msgpack.encode(Echo(caller=7, seq=0))
    unknown_tag = msgspec.msgpack.encode({"type": "DropTables"})
    async with running(actor):
        outcomes = await _queue_behind_a_sleeper(
            actor, good, b"\xc1\xff not msgpack", unknown_tag, Echo(caller=8, seq=0)
        )
        assert outcomes[0] == (7, 0)
        assert isinstance(outcomes[1], InvalidInput)
        assert "undecodable" in str(outcomes[1])
        assert isinstance(outcomes[2], InvalidInput)
        assert outcomes[3] == (8, 0)


async def test_close_drains_queued_work_then_refuses_calls() -> None:
    actor = RecordingActor(batch_delay=0.01)
    results: list[object] = []

    async def caller(n: int) -> None:
        results.append(await actor.call(Echo(caller=n, seq=0)))

    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        for n in range(20):
            tg.start_soon(caller, n)
        await anyio.sleep(0.001)
        await actor.aclose()

    assert len(results) == 20  # everything queued before close ran
    assert actor.torn_down
    with pytest.raises(ActorClosed, match="closed"):
        await actor.call(Echo(caller=0, seq=1))


async def test_handler_crash_fails_pending_and_later_callers_promptly() -> None:
    actor = RecordingActor(mailbox_size=2, max_batch=1)
    errors: list[BaseException] = []

    async def caller(command: object) -> None:
        try:
            await actor.call(command)
        except ActorClosed as exc:
            errors.append(exc)

    with anyio.fail_after(30):  # "promptly": never hanging; 2 s could lapse on a loaded CI machine
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            tg.start_soon(caller, Sleep(seconds=0.02))
            await anyio.sleep(0.005)
            tg.start_soon(caller, Crash())
            await anyio.sleep(0.001)
            # More callers than the mailbox holds: some wait in the mailbox, some on its full edge.
            for n in range(6):
                tg.start_soon(caller, Echo(caller=n, seq=0))

    assert len(errors) == 7  # the crashing command and everything behind it
    assert all(isinstance(e.__cause__, RuntimeError) for e in errors)
    assert all("died" in str(e) for e in errors)
    with pytest.raises(ActorClosed) as info:
        await actor.call(Echo(caller=99, seq=0))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert actor.torn_down


async def test_cancelled_caller_does_not_break_its_batch() -> None:
    actor = RecordingActor(batch_delay=0.05)
    async with running(actor):
        async with anyio.create_task_group() as tg:
            tg.start_soon(actor.call, Echo(caller=0, seq=0))  # occupies the actor
            await anyio.sleep(0.01)
            with anyio.move_on_after(0.01):
                await actor.call(Echo(caller=1, seq=0))  # queued, then its caller gives up
            tg.start_soon(actor.call, Echo(caller=2, seq=0))
        assert await actor.call(Echo(caller=3, seq=0)) == (3, 0)
    callers = [c.caller for c in actor.executed if isinstance(c, Echo)]
    assert callers == [0, 1, 2, 3]  # the abandoned command still ran, in its place


async def test_bad_actor_settings_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="mailbox_size"):
        RecordingActor(mailbox_size=0)
    with pytest.raises(InvalidInput, match="max_batch"):
        RecordingActor(max_batch=0)


async def test_store_runs_and_closes_its_actors(tmp_path: anyio.Path) -> None:
    actor = RecordingActor()
    async with open_store(tmp_path / "s") as store:
        await store.start_actor(actor)
        assert await actor.call(Echo(caller=1, seq=1)) == (1, 1)
    assert actor.torn_down
    with pytest.raises(ActorClosed):
        await actor.call(Echo(caller=1, seq=2))


async def test_owner_thread_runs_jobs_in_order_and_survives_a_failing_posted_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pforge_async.owner import OwnerThread

    worker = OwnerThread("test-owner")
    seen: list[int] = []

    def boom() -> None:
        raise RuntimeError("posted job failed")

    try:
        worker.post(seen.append, 1)
        worker.post(boom)
        worker.post(seen.append, 2)
        # A job that is awaited runs after those posted before it, on the same thread.
        assert await worker.run(lambda: list(seen)) == [1, 2]
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 / 0)
        assert await worker.run(len, seen) == 2
    finally:
        await worker.stop()
    assert "posted job failed" in caplog.text


async def test_send_mails_at_once_and_its_awaitable_answers_as_call_does() -> None:
    actor = RecordingActor(mailbox_size=2, max_batch=1)
    async with running(actor), anyio.create_task_group() as tg:
        tg.start_soon(actor.call, Sleep(seconds=0.05))
        await anyio.sleep(0.01)  # the actor is busy with it
        first = actor.send(Echo(caller=1, seq=0))  # mailed now, before anything awaits it
        rejected = actor.send(Reject(why="nope"))
        third = actor.send(Echo(caller=3, seq=0))  # the mailbox is full: mailed once awaited
        assert actor.queued == 2
        assert await third == (3, 0)
        assert await first == (1, 0)
        with pytest.raises(InvalidInput, match="nope"):
            await rejected
    assert [c.caller for c in actor.executed if isinstance(c, Echo)] == [1, 3]
    with pytest.raises(ActorClosed, match="closed"):
        actor.send(Echo(caller=4, seq=0))

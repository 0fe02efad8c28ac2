"""The filesystem turn log when a write fails part way (a full disk, a file size limit): what the
log actor decided in memory for the failed batch was never on disk, so it must not be served nor
built on. The write fails here through ``RLIMIT_FSIZE`` (writes past the limit get ``EFBIG``, the
first of them cut short), in a child process of its own so the limit touches nothing else."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_CHILD = textwrap.dedent(
    """
    import resource, signal, sys, anyio
    from pforge_async import PforgeError
    from pforge_async.turnstore import FsTurnStore

    directory = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal

    async def main():
        async with FsTurnStore(directory) as store:
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
            except PforgeError as exc:
                print("refused after the failure:", type(exc).__name__)
        async with FsTurnStore(directory) as store:
            assert await store.check() == [], await store.check()
            chain = [t.turn_id for t in await store.list_turns(ctx)]
            assert chain == acked, (chain, acked)
            await store.append_turn(ctx, "t", b"again")
            assert await store.check() == []
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

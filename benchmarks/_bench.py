"""What the benchmarks share: the machine and versions they print first (this machine is noisy), and
the loop that drives concurrent callers."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import anyio


def describe(*packages: str) -> str:
    names = ("pforge_async", "anyio", "msgspec", "aiosqlite", "aiofiles", *packages)
    versions = []
    for name in names:
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    cpu = platform.processor() or platform.machine()
    return (
        f"# {platform.node()} {platform.system()} {platform.release()} {cpu}, "
        f"{os.cpu_count()} cores; Python {sys.version.split()[0]}\n# " + ", ".join(versions)
    )


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run_callers(callers: int, per_caller: int, op: Callable[[int], Awaitable[Any]]) -> float:
    """Seconds for ``callers`` tasks each awaiting ``op(n)`` ``per_caller`` times (``n`` unique)."""

    async def caller(c: int) -> None:
        for i in range(per_caller):
            await op(c * per_caller + i)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for c in range(callers):
            tg.start_soon(caller, c)
    return time.perf_counter() - start

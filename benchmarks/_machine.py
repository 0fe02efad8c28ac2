"""What every benchmark prints first: the machine and the versions, because this machine is noisy."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version


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

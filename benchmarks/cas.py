"""Workspace snapshots: pforge_async's CAS against ``git add -A`` and dulwich, on the same data, in one run.

Run: ``python benchmarks/cas.py [--files 10000] [--big-mib 256]``. Each contender runs in its own
child process, so its peak memory (max RSS) is its own. Data: ``--files`` files of 4 KiB of
source-like text in nested directories, then one ``--big-mib`` MiB file. pforge uses durability
``"full"`` (files and directories fsynced); git and dulwich run with their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import describe


def make_files(root: Path, count: int) -> None:
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10))) for _ in range(3000)]
    text = []
    size = 0
    while size < 4096 * 64:
        word = rng.choice(words) + rng.choice(" \n(),.=:")
        text.append(word)
        size += len(word)
    corpus = "".join(text).encode()
    for i in range(count):
        d = root / f"pkg{i // 1000}" / f"mod{(i // 100) % 10}"
        d.mkdir(parents=True, exist_ok=True)
        start = (i * 4099) % (len(corpus) - 4096)
        (d / f"file{i}.py").write_bytes(b"# %d\n" % i + corpus[start : start + 4090])


def make_big(root: Path, mib: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    block = random.Random(3).randbytes(1 << 20)
    with open(root / "big.bin", "wb") as f:
        for i in range(mib):
            f.write(block[i:] + block[:i])  # no two MiB alike


# -- contenders, each run in a child process ------------------------------------------------------


def run_pforge(data: str, work: str, repeat: int, watch: bool = True) -> list[float]:
    import anyio

    from pforge_async import open_store

    async def go() -> list[float]:
        times = []
        warm = os.path.join(work, "warm-up")
        os.makedirs(warm, exist_ok=True)
        with open(os.path.join(warm, "f"), "wb") as f:
            f.write(b"warm")
        async with open_store(os.path.join(work, ".pforge"), watch_workspaces=watch) as store:
            await store.cas.snapshot(warm)  # threads and imports up, as in a long-lived agent
            for _ in range(repeat):
                start = time.perf_counter()
                await store.cas.snapshot(data)
                times.append(time.perf_counter() - start)
        return times

    return anyio.run(go)


def run_git(data: str, work: str, repeat: int) -> list[float]:
    gitdir = os.path.join(work, "git")
    if not os.path.exists(gitdir):
        subprocess.run(["git", "init", "-q", "--bare", "--object-format=sha256", gitdir], check=True)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(["git", f"--git-dir={gitdir}", f"--work-tree={data}", "add", "-A"], check=True)
        subprocess.run(
            ["git", f"--git-dir={gitdir}", f"--work-tree={data}", "write-tree"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        times.append(time.perf_counter() - start)
    return times


def run_dulwich(data: str, work: str, repeat: int) -> list[float]:
    from dulwich.index import commit_tree
    from dulwich.objects import Blob
    from dulwich.repo import Repo

    repo = Repo.init_bare(os.path.join(work, "dulwich"), mkdir=True, object_format="sha256")
    fmt = repo.object_format
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        blobs = []
        entries = []
        for dirpath, _dirs, files in os.walk(data):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    blob = Blob.from_string(f.read())
                blobs.append((blob, None))
                rel = os.path.relpath(path, data).encode()
                entries.append((rel, blob.get_id(fmt), 0o100644))
        repo.object_store.add_objects(blobs)
        commit_tree(repo.object_store, entries, object_format=fmt)
        times.append(time.perf_counter() - start)
    return times


def run_pforge_stat_cache(data: str, work: str, repeat: int) -> list[float]:
    return run_pforge(data, work, repeat, watch=False)


CONTENDERS = {  # git first: it runs on the quietest disk
    "git": run_git,
    "pforge": run_pforge,
    "pforge-nowatch": run_pforge_stat_cache,
    "dulwich": run_dulwich,
}


def child(contender: str, data: str, work: str, repeat: int) -> None:
    times = CONTENDERS[contender](data, work, repeat)
    print(json.dumps(times))


def measure(contender: str, data: Path, work: Path, repeat: int) -> tuple[list[float], float]:
    work.mkdir(parents=True, exist_ok=True)
    os.sync()  # nobody pays for the previous contender's dirty pages
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", contender, str(data), str(work), str(repeat)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{contender} failed")
    # git's peak is its largest child's; ru_maxrss is in KiB on Linux.
    return json.loads(out), usage.ru_maxrss / 1024


def drop_caches_hint(data: Path) -> None:
    # Read everything once so every contender starts with a warm page cache, as in real reuse.
    for dirpath, _dirs, files in os.walk(data):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 20):
                    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--child", nargs=4, metavar=("CONTENDER", "DATA", "WORK", "REPEAT"))
    args = parser.parse_args()
    if args.child:
        contender, data, work, repeat = args.child
        child(contender, data, work, int(repeat))
        return

    print(describe("dulwich"))
    print(f"# git: {subprocess.run(['git', '--version'], capture_output=True, text=True).stdout.strip()}")
    base = Path(tempfile.mkdtemp(prefix="pforge-bench-cas-", dir=os.environ.get("BENCH_DIR")))
    try:
        files = base / "files"
        make_files(files, args.files)
        drop_caches_hint(files)
        total_mb = args.files * 4096 / 1e6
        print(f"\n## {args.files} files of 4 KiB ({total_mb:.0f} MB): first snapshot, then unchanged")
        head = ("contender", "first s", "obj/s", "MB/s", "again s", "1st/again", "peak MiB")
        print(" ".join(f"{h:>{w}}" for h, w in zip(head, (14, 8, 9, 7, 8, 9, 9), strict=True)))
        results = {}
        for name in CONTENDERS:
            times, peak = measure(name, files, base / f"work-{name}", 2)
            results[name] = times
            first, again = times
            print(
                f"{name:>14} {first:>8.3f} {args.files / first:>9.0f} {total_mb / first:>7.1f} "
                f"{again:>8.4f} {first / again:>9.1f} {peak:>9.0f}"
            )
        git_first, git_again = results["git"]
        p_first, p_again = results["pforge"]
        print(
            f"pforge vs git: first snapshot {git_first / p_first:.1f}x git's rate (target >= 5); "
            f"unchanged re-snapshot {p_first / p_again:.1f}x faster than pforge's first (target >= 20); "
            f"unchanged vs git's unchanged add: {git_again / p_again:.2f}x"
        )
        print(f"pforge vs dulwich: first snapshot {results['dulwich'][0] / p_first:.1f}x dulwich's rate")
        nowatch_first, nowatch_again = results["pforge-nowatch"]
        print(
            f"without the change watch (a new process, or watch_workspaces=False): unchanged "
            f"re-snapshot {nowatch_first / nowatch_again:.1f}x faster than the first, "
            f"{git_again / nowatch_again:.2f}x git's unchanged add"
        )

        big = base / "big"
        make_big(big, args.big_mib)
        drop_caches_hint(big)
        mb = args.big_mib * (1 << 20) / 1e6
        print(f"\n## one file of {args.big_mib} MiB")
        print(f"{'contender':>14} {'s':>8} {'MB/s':>7} {'peak MiB':>9}")
        big_results = {}
        for name in ("git", "pforge", "dulwich"):
            (seconds,), peak = measure(name, big, base / f"big-{name}", 1)
            big_results[name] = seconds
            print(f"{name:>14} {seconds:>8.3f} {mb / seconds:>7.1f} {peak:>9.0f}")
        print(f"pforge vs git on the big file: {big_results['git'] / big_results['pforge']:.1f}x git's rate")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

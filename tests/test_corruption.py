"""A damaged disk: one byte flipped at random in each kind of file the store has.

For every kind of file (each database, a pack, a pack index, a loose object, the ``FsTurnStore`` log)
and several seeded positions, a copy of one written store gets one byte flipped, and then every piece
of data the store was given is read back through the public API and compared with what was written:

- a read of damaged data raises ``IntegrityError``, or ``store.check()`` names the damage;
- no read ever returns wrong bytes (turn payloads and CAS objects carry hashes: never, whatever
  ``check`` says);
- the data the flipped byte cannot have touched (every other file) still serves, exactly;
- nothing raises anything but a ``PforgeError`` (``IntegrityError`` where data is damaged).

What a flipped byte can still slip through (fields that carry no checksum of their own, see
``_UNPROTECTED``) is counted, not hidden: the README's "What the store defends against" lists it.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from pforge_async import (
    ActorClosed,
    FsTurnStore,
    IntegrityError,
    NonceReplayed,
    PforgeError,
    Store,
    TurnNotFound,
    connect,
)
from pforge_async.cas.pack import PackIndex

pytestmark = pytest.mark.anyio

#: positions per kind of file; PFORGE_CORRUPTION_SEEDS=200 for a long sweep.
SEEDS = range(int(os.environ.get("PFORGE_CORRUPTION_SEEDS", "6")))
#: these tests are about damage, not durability: no fsync per batch, no WAL reserve at each open.
OPTIONS: dict[str, Any] = {"watch_workspaces": False, "durability": "normal"}
DATABASES = ("turns.db", "memory.db", "nonces.db", "budget.db")
#: what a flipped byte may change with no error and no check noticing: values stored with no
#: checksum of their own and bound by no invariant. (area, field) pairs; see the module docstring.
_UNPROTECTED = {
    ("turns", "record"),  # a turn's metadata columns (type_id, created_at_ms, ...): its payload is hashed
    ("turns", "head"),  # a context's head pointer, when it still points at a turn of the same context
    ("memory", "stats"),
    ("nonces", "state"),
    ("budget", "totals"),
}


def _flip(path: Path, rng: random.Random, targets: list[int]) -> int:
    """Flip one bit of one byte of ``path``: half the seeds anywhere, half inside the data."""
    data = bytearray(path.read_bytes())
    at = rng.choice(targets) if targets and rng.random() < 0.5 else rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    return at


# -- the store that gets damaged ------------------------------------------------------------------


class Written:
    """What the store was given, to compare every read with."""

    def __init__(self) -> None:
        self.payloads: dict[int, bytes] = {}  # turn id -> payload
        self.records: dict[int, Any] = {}  # turn id -> TurnRecord as first read
        self.chains: dict[int, list[int]] = {}  # context id -> turn ids, newest first
        self.heads: dict[int, Any] = {}
        self.blobs: dict[str, bytes] = {}
        self.loose: str = ""
        self.tree: str = ""
        self.commit: str = ""
        self.states: dict[str, Any] = {}  # constellation state -> stats
        self.vendors: dict[str, Any] = {}  # vendor -> totals
        self.fresh_nonces: list[str] = []
        self.used_nonces: list[str] = []


async def _write_store(root: Path, work: Path) -> Written:
    rng = random.Random(1234)
    w = Written()
    async with connect(root, **OPTIONS) as store:
        for c in range(3):
            ctx = await store.turns.create_context()
            for t in range(8):
                size = rng.choice([16, 200, 3000, 9000])  # some span SQLite overflow pages
                payload = f"ctx {c} turn {t} ".encode() + rng.randbytes(size)
                turn = await store.turns.append_turn(ctx.context_id, "user" if t % 2 else "assistant", payload)
                w.payloads[turn.turn_id] = payload
            w.chains[ctx.context_id] = [t.turn_id for t in reversed(await store.turns.list_turns(ctx.context_id))]
        for batch in range(3):  # a pack per write
            for i in range(6):
                data = f"blob {batch}.{i} ".encode() + rng.randbytes(rng.choice([10, 500, 5000]))
                w.blobs[await store.cas.write_blob(data)] = data
        work.mkdir()
        big = rng.randbytes(1 << 20)  # a large file streams into a loose object
        (work / "big.bin").write_bytes(big)
        w.tree = await store.cas.snapshot(work)
        (entry,) = await store.cas.read_tree(w.tree)
        w.loose = entry.oid
        w.blobs[w.loose] = big
        w.commit = await store.cas.write_commit(w.tree, message="snapshot")
        for s in range(5):
            for a in range(3):
                reward, success = rng.random(), rng.random() < 0.5
                await store.memory.record_transition(f"state{s}", f"action{a}", "next", reward, success)
        for v in range(4):
            await store.budget.set_budget(f"vendor{v}", tokens=10**6)
            for _ in range(5):
                await store.budget.record_spend(
                    f"vendor{v}", "model", input_tokens=rng.randrange(1000), output_tokens=10, cost=rng.randrange(99)
                )
        for n in range(10):
            nonce = await store.nonces.issue(f"subject{n}", 3600)
            if n % 2:
                await store.nonces.consume(nonce, f"subject{n}")
                w.used_nonces.append(nonce)
            else:
                w.fresh_nonces.append(nonce)
        for turn_id in w.payloads:
            w.records[turn_id] = await store.turns.get_turn(turn_id)
        for context_id in w.chains:
            w.heads[context_id] = await store.turns.get_head(context_id)
        for s in range(5):
            w.states[f"state{s}"] = await store.memory.stats(f"state{s}")
        for v in range(4):
            w.vendors[f"vendor{v}"] = await store.budget.totals(f"vendor{v}")
        assert (await store.check()).ok
    return w


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Written]:
    base = tmp_path_factory.mktemp("pristine")
    written = anyio.run(_write_store, base / "store", base / "work")
    return base / "store", written


# -- reading everything back ----------------------------------------------------------------------


class Outcome:
    """Every read of one damaged store, by area: exact, IntegrityError, or a wrong answer."""

    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}
        self.wrong: list[tuple[str, str, str]] = []  # (area, field, what)
        self.other: list[str] = []  # exceptions that are not allowed at all

    async def read(self, area: str, field: str, call: Callable[[], Awaitable[Any]], expected: Any) -> None:
        try:
            got = await call()
        except IntegrityError as exc:
            self.errors.setdefault(area, []).append(str(exc))
            return
        except Exception as exc:
            self.other.append(f"{area}.{field}: {exc!r}")
            return
        if got != expected:
            self.wrong.append((area, field, f"{got!r:.200} != {expected!r:.200}"))

    def touched(self) -> set[str]:
        return set(self.errors) | {area for area, _, _ in self.wrong}


async def _read_all(store: Store, w: Written, out: Outcome) -> None:
    turns, cas = store.turns, store.cas
    for turn_id, payload in w.payloads.items():

        async def payload_of(turn_id: int = turn_id) -> bytes:
            return (await turns.get_turn(turn_id)).payload

        await out.read("turns", "payload", payload_of, payload)
        await out.read("turns", "record", lambda turn_id=turn_id: turns.get_turn(turn_id), w.records[turn_id])
    for context_id, chain in w.chains.items():

        async def payloads(context_id: int = context_id) -> list[bytes]:
            return [t.payload for t in await turns.list_turns(context_id, limit=100)]

        await out.read("turns", "payload", payloads, [w.payloads[t] for t in reversed(chain)])
        await out.read("turns", "head", lambda context_id=context_id: turns.get_head(context_id), w.heads[context_id])
    for oid, data in w.blobs.items():
        await out.read("cas", "payload", lambda oid=oid: cas.read_blob(oid), data)

    async def tree() -> list[str]:
        return [e.oid for e in await cas.read_tree(w.tree)]

    await out.read("cas", "payload", tree, [w.loose])

    async def commit_tree() -> str:
        return (await cas.read_commit(w.commit)).tree

    await out.read("cas", "payload", commit_tree, w.tree)
    for state, stats in w.states.items():
        await out.read("memory", "stats", lambda state=state: store.memory.stats(state), stats)
    for vendor, totals in w.vendors.items():
        await out.read("budget", "totals", lambda vendor=vendor: store.budget.totals(vendor), totals)
    # Nonces have no read: consuming is the read. A used one must stay used, a fresh one consumable.
    for n, nonce in enumerate(w.used_nonces):
        await out.read("nonces", "state", _consumer(store, nonce, f"subject{2 * n + 1}"), "replayed")
    for n, nonce in enumerate(w.fresh_nonces):
        await out.read("nonces", "state", _consumer(store, nonce, f"subject{2 * n}"), "ok")


def _consumer(store: Store, nonce: str, subject: str) -> Callable[[], Awaitable[str]]:
    return lambda: _consume(store, nonce, subject)


async def _consume(store: Store, nonce: str, subject: str) -> str:
    try:
        await store.nonces.consume(nonce, subject)
    except NonceReplayed:
        return "replayed"
    except PforgeError as exc:
        if isinstance(exc, IntegrityError):
            raise
        return type(exc).__name__
    return "ok"


def _judge(out: Outcome, problems: list[str] | None, damaged_area: str, names: list[str]) -> list[str]:
    """What broke a promise, given what the reads got and what check() reported (None: no check)."""
    broken = list(out.other)
    for area, field, what in out.wrong:
        if area != damaged_area:
            broken.append(f"undamaged {area} returned a wrong {field}: {what}")
        elif field == "payload":
            broken.append(f"wrong bytes returned as good: {what}")
        elif not _named(problems, names):
            if (area, field) not in _UNPROTECTED:
                broken.append(f"a wrong {area} {field} and check() names nothing: {what}")
            _slipped(area, field, what)
    for area, errors in out.errors.items():
        if area != damaged_area:
            broken.append(f"undamaged {area} raised IntegrityError: {errors[0]}")
        elif problems is not None and not _named(problems, names):
            broken.append(f"reads of {area} raised IntegrityError ({errors[0]}) but check() names nothing: {problems}")
    return broken


def _slipped(area: str, field: str, what: str) -> None:
    """A wrong value nothing noticed, in a field known to carry no checksum: logged for the README's
    list of what a flipped byte can still slip through (``PFORGE_CORRUPTION_LOG=file``)."""
    log = os.environ.get("PFORGE_CORRUPTION_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{area}\t{field}\t{what}\n")


def _named(problems: list[str] | None, names: list[str]) -> bool:
    return bool(problems) and any(name in p for p in problems or [] for name in names)


async def _open_and_judge(root: Path, w: Written, area: str, names: list[str]) -> list[str]:
    out = Outcome()
    try:
        store = await connect(root, **OPTIONS)
    except IntegrityError as exc:
        # Refusing to open is allowed only for a file the whole store depends on, and must name it.
        return [f"the store refused to open over one damaged file of {area}: {exc}"]
    except Exception as exc:
        return [f"opening raised {exc!r}"]
    try:
        await _read_all(store, w, out)
        try:
            report = await store.check()
            problems: list[str] | None = report.problems
        except Exception as exc:
            return [f"check() raised {exc!r}", *_judge(out, None, area, names)]
        # The store still writes, beside the damage.
        ctx = await store.turns.create_context() if area != "turns" else None
        if ctx is not None:
            assert (await store.turns.append_turn(ctx.context_id, "t", b"after")).payload == b"after"
        assert await store.cas.read_blob(await store.cas.write_blob(b"after the damage")) == b"after the damage"
    finally:
        await store.aclose()
    return _judge(out, problems, area, names)


def _copy(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    return root


def _targets(path: Path, needles: Iterator[bytes]) -> list[int]:
    """Offsets inside ``path`` where the given pieces of data lie (as stored, uncompressed)."""
    data = path.read_bytes()
    found = []
    for needle in needles:
        at = data.find(needle[:64])
        if at >= 0:
            found.extend(range(at, at + min(len(needle), 64)))
    return found


# -- the tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("database", DATABASES)
async def test_a_flipped_byte_in_a_database(
    pristine: tuple[Path, Written], tmp_path: Path, database: str, seed: int
) -> None:
    source, w = pristine
    root = _copy(source, tmp_path)
    area = database.removesuffix(".db")
    path = root / database
    needles = iter(w.payloads.values()) if area == "turns" else iter(())
    at = _flip(path, random.Random(f"{database}-{seed}"), _targets(path, needles))
    broken = await _open_and_judge(root, w, area, [database, "turn "])
    assert broken == [], f"byte {at} of {database}: {broken}"


@pytest.mark.parametrize(
    ("database", "text"),
    [("turns.db", b"assistant"), ("memory.db", b"action1"), ("nonces.db", b"subject3"), ("budget.db", b"vendor2")],
)
async def test_text_that_is_no_longer_utf8_is_an_integrity_error_and_checked(
    pristine: tuple[Path, Written], tmp_path: Path, database: str, text: bytes
) -> None:
    # Text columns carry no checksum, and SQLite's integrity check does not look inside values: a
    # flipped high bit that leaves invalid UTF-8 must still fail its reads as damage, and check() must
    # find it (a full scan of every text value).
    source, w = pristine
    root = _copy(source, tmp_path)
    path = root / database
    data = bytearray(path.read_bytes())
    for at in [i for i in range(len(data)) if data.startswith(text, i)]:
        data[at + 2] |= 0x80  # every copy: the table's and its indexes'
    path.write_bytes(bytes(data))
    broken = await _open_and_judge(root, w, database.removesuffix(".db"), [database])
    assert broken == []


@pytest.mark.parametrize("database", DATABASES)
async def test_a_database_too_damaged_to_open_fails_alone(
    pristine: tuple[Path, Written], tmp_path: Path, database: str
) -> None:
    source, w = pristine
    root = _copy(source, tmp_path)
    path = root / database
    data = bytearray(path.read_bytes())
    data[:16] = b"not a database!\0"  # SQLite's magic: no connection can open it now
    path.write_bytes(bytes(data))
    # A WAL left beside the file may hold page 1, which SQLite would read instead of the damaged
    # header: empty it, so the damage is what every connection sees.
    for sidecar in (f"{database}-wal", f"{database}-shm"):
        (root / sidecar).unlink(missing_ok=True)
    area = database.removesuffix(".db")
    store = await connect(root, **OPTIONS)
    out = Outcome()
    try:
        await _read_all(store, w, out)
        problems = (await store.check()).problems
    finally:
        await store.aclose()
    assert out.other == [] and out.wrong == []
    assert set(out.errors) == {area}  # every read of that part, and only of it, is IntegrityError
    assert all(database in error for error in out.errors[area])
    assert any(database in p and "cannot be opened" in p for p in problems), problems
    after_close = {
        "turns": lambda: store.turns.get_turn(1),
        "memory": lambda: store.memory.stats("state0"),
        "nonces": lambda: store.nonces.purge_expired(),
        "budget": lambda: store.budget.totals("vendor0"),
    }
    with pytest.raises(ActorClosed):
        await after_close[area]()


def _packs(root: Path) -> list[Path]:
    return sorted((root / "cas" / "objects" / "pack").glob("pack-*.pack"))


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_flipped_byte_in_a_pack(pristine: tuple[Path, Written], tmp_path: Path, seed: int) -> None:
    source, w = pristine
    root = _copy(source, tmp_path)
    rng = random.Random(f"pack-{seed}")
    pack = rng.choice(_packs(root))
    at = _flip(pack, rng, _targets(pack, iter(w.blobs.values())))
    names = [pack.name, "cas: object"]
    broken = await _open_and_judge(root, w, "cas", names)
    assert broken == [], f"byte {at} of {pack.name}: {broken}"


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_flipped_byte_in_a_pack_index(pristine: tuple[Path, Written], tmp_path: Path, seed: int) -> None:
    source, w = pristine
    root = _copy(source, tmp_path)
    rng = random.Random(f"idx-{seed}")
    idx = rng.choice(_packs(root)).with_suffix(".idx")
    at = _flip(idx, rng, [])
    out = Outcome()
    # An index is rebuilt from its pack: every read answers exactly, and check() says what happened.
    async with connect(root, **OPTIONS) as store:
        await _read_all(store, w, out)
        problems = (await store.check()).problems
    assert out.other == [] and out.wrong == [] and out.errors == {}, f"byte {at} of {idx.name}"
    assert any(idx.name in p and "quarantine" in p for p in problems), problems
    async with connect(root, **OPTIONS) as store:  # and the index on disk is whole again
        for oid, data in w.blobs.items():
            assert await store.cas.read_blob(oid) == data
        assert (await store.cas.fsck()).ok


async def test_a_read_only_open_rebuilds_a_damaged_index_in_memory_only(
    pristine: tuple[Path, Written], tmp_path: Path
) -> None:
    source, w = pristine
    root = _copy(source, tmp_path)
    idx = _packs(root)[0].with_suffix(".idx")
    _flip(idx, random.Random(7), [])
    damaged = idx.read_bytes()
    async with connect(root, readonly=True) as store:
        for oid, data in w.blobs.items():
            assert await store.cas.read_blob(oid) == data
        problems = (await store.check()).problems
    assert any(idx.name in p and "in memory only" in p for p in problems), problems
    assert idx.read_bytes() == damaged
    assert not (root / "cas" / "quarantine").exists()


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_flipped_byte_in_a_loose_object(pristine: tuple[Path, Written], tmp_path: Path, seed: int) -> None:
    source, w = pristine
    root = _copy(source, tmp_path)
    loose = root / "cas" / "objects" / w.loose[:2] / w.loose[2:]
    at = _flip(loose, random.Random(f"loose-{seed}"), [])
    broken = await _open_and_judge(root, w, "cas", [w.loose])
    assert broken == [], f"byte {at} of the loose object: {broken}"


@pytest.mark.parametrize("type_bits", [0, 5, 6, 7])
async def test_damaged_type_bits_in_a_pack_entry_are_an_integrity_error(
    pristine: tuple[Path, Written], tmp_path: Path, type_bits: int
) -> None:
    source, w = pristine
    root = _copy(source, tmp_path)
    pack = _packs(root)[2]
    (oid,) = [raw.hex() for raw in PackIndex(str(pack.with_suffix(".idx"))).offsets]
    data = bytearray(pack.read_bytes())
    data[12] = (data[12] & 0x8F) | (type_bits << 4)  # the first entry's type: none, reserved, or a delta
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    async with connect(root, **OPTIONS) as store:
        with pytest.raises(IntegrityError, match=oid) as info:
            await store.cas.read_blob(oid)
        assert pack.name in str(info.value)
        for other, content in w.blobs.items():
            if other != oid:
                assert await store.cas.read_blob(other) == content
        assert oid in (await store.cas.fsck()).corrupt
        assert any(oid in p for p in (await store.check()).problems)


async def test_a_damaged_index_and_its_damaged_pack_lose_only_that_pack(
    pristine: tuple[Path, Written], tmp_path: Path
) -> None:
    source, w = pristine
    root = _copy(source, tmp_path)
    pack = _packs(root)[0]
    _flip(pack.with_suffix(".idx"), random.Random(1), [])
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x10  # mid-pack: the walk that rebuilds the index stops there
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    out = Outcome()
    async with connect(root, **OPTIONS) as store:
        await _read_all(store, w, out)
        report = await store.check()
    assert out.other == [] and out.wrong == []
    assert set(out.errors) == {"cas"}
    assert any(pack.name in p for p in report.problems), report.problems
    assert report.cas.corrupt  # the objects that could not be recovered are named


async def test_a_deleted_index_is_rebuilt_from_its_pack(pristine: tuple[Path, Written], tmp_path: Path) -> None:
    source, w = pristine
    root = _copy(source, tmp_path)
    pack = _packs(root)[1]
    pack.with_suffix(".idx").unlink()
    old = os.stat(pack).st_mtime - 3600  # older than any live writer's pack in flight
    os.utime(pack, (old, old))
    out = Outcome()
    async with connect(root, **OPTIONS) as store:
        await _read_all(store, w, out)
        assert (await store.check()).ok
    assert out.other == [] and out.wrong == [] and out.errors == {}
    assert pack.with_suffix(".idx").exists()


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_flipped_byte_in_the_cas_config(pristine: tuple[Path, Written], tmp_path: Path, seed: int) -> None:
    # The config says the repository is SHA-256: damaged, it must not make the store unopenable.
    source, w = pristine
    root = _copy(source, tmp_path)
    config = root / "cas" / "config"
    sound = config.read_bytes()
    at = _flip(config, random.Random(f"config-{seed}"), [])
    async with connect(root, readonly=True) as store:
        assert await store.cas.read_blob(w.loose) == w.blobs[w.loose]
        assert any("config" in p for p in (await store.check()).problems)
    broken = await _open_and_judge(root, w, "cas", ["config"])
    assert broken == [], f"byte {at} of cas/config: {broken}"
    assert config.read_bytes() == sound
    assert [p.name.split(".")[0] for p in (root / "cas" / "quarantine").iterdir()] == ["config"]


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_flipped_byte_in_the_snapshot_stat_cache(tmp_path: Path, seed: int) -> None:
    # Only a cache: damage costs a re-read of the files, never a wrong tree or a failed snapshot.
    work = tmp_path / "work"
    work.mkdir()
    for i in range(30):
        (work / f"f{i}.txt").write_text(f"file {i}\n" * i)
        os.utime(work / f"f{i}.txt", (1_600_000_000, 1_600_000_000))  # old enough to be cached
    async with connect(tmp_path / "s", **OPTIONS) as store:
        tree = await store.cas.snapshot(work)
    (cache,) = (tmp_path / "s" / "cache").iterdir()
    at = _flip(cache, random.Random(f"cache-{seed}"), [])
    async with connect(tmp_path / "s", **OPTIONS) as store:
        assert await store.cas.snapshot(work) == tree, f"byte {at} of the stat cache"
        assert (await store.check()).ok


# -- FsTurnStore's log ------------------------------------------------------------------------------


async def _write_log(directory: Path) -> dict[int, bytes]:
    rng = random.Random(99)
    payloads: dict[int, bytes] = {}
    async with FsTurnStore(directory) as store:
        for _ in range(3):
            ctx = await store.create_context()
            for t in range(6):
                payload = f"log turn {t} ".encode() + rng.randbytes(rng.choice([20, 400, 4000]))
                payloads[(await store.append_turn(ctx.context_id, "t", payload)).turn_id] = payload
    return payloads


def _last_frame(log: Path) -> int:
    """Where the last frame of a turn log starts (frames: u32 length, two u32 checksums, record)."""
    data = log.read_bytes()
    pos = last = len(b"pforge-turns v1\n")
    while pos < len(data):
        last = pos
        pos += 12 + struct.unpack_from("<I", data, pos)[0]
    return last


@pytest.fixture(scope="module")
def pristine_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, bytes]]:
    directory = tmp_path_factory.mktemp("pristine-log") / "log"
    return directory, anyio.run(_write_log, directory)


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_flipped_byte_in_the_turn_log(
    pristine_log: tuple[Path, dict[int, bytes]], tmp_path: Path, seed: int
) -> None:
    source, payloads = pristine_log
    directory = tmp_path / "log"
    shutil.copytree(source, directory)
    log = directory / "turns.log"
    at = _flip(log, random.Random(f"log-{seed}"), _targets(log, iter(payloads.values())))
    # The log's documented limit: a last frame that fails its checksum is taken for a torn write (its
    # append cannot be told from one that never finished) and dropped. Only the last turn may go so.
    last = max(payloads) if at >= _last_frame(source / "turns.log") else None
    out = Outcome()
    try:
        store = FsTurnStore(directory)
        await store.__aenter__()
    except IntegrityError as exc:
        # The log is one file: refusing to load it, naming it and the place, is a local failure.
        assert str(log) in str(exc) or "turn" in str(exc)
        return
    try:
        for turn_id, payload in payloads.items():

            async def payload_of(turn_id: int = turn_id, payload: bytes = payload) -> bytes:
                try:
                    return (await store.get_turn(turn_id)).payload
                except TurnNotFound:
                    if turn_id == last:
                        return payload
                    raise

            await out.read("log", "payload", payload_of, payload)
        problems = await store.check()
    finally:
        await store.__aexit__(None, None, None)
    assert out.other == [], f"byte {at} of turns.log: {out.other}"
    assert out.wrong == [], f"byte {at} of turns.log: wrong bytes returned as good: {out.wrong}"
    if out.errors:
        assert problems, f"byte {at} of turns.log: reads raised IntegrityError but check() names nothing"

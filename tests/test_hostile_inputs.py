"""Hostile input: every public method of an open store, thrown arbitrary values.

Each test takes one public method, found by introspection (``Store``'s own methods and those of every
part its annotations name: ``cas``, ``turns``, ``memory``, ``nonces``, ``budget``), so a method added
later is covered without editing this file. It opens one store, seeds it with a little of
everything, and then:

1. sweeps: every parameter in turn gets every value of ``EDGE_VALUES`` (one of each kind: None, bools,
   huge and negative ints, 2**63, 2**64, NaN, infinities, 1e300, str with lone surrogates, NUL and
   5,000 chars, bytes, containers, enum members, library structs with hostile fields, plain
   objects), the other required parameters a value the store really holds. Every failing call is
   listed at once;
2. lets Hypothesis draw the arguments: most examples make one parameter hostile and give the others
   plausible values, the rest draw every parameter (required ones always, optional ones sometimes,
   by position or by keyword) from a broad recursive strategy.

The assertions: a call returns or raises a ``PforgeError``, never anything else, never ``ActorClosed``
(the store is open: a part died, or says so wrongly) and never blocks past ``CALL_TIMEOUT``; after
every example (and every parameter's sweep) each part of the store still serves a known-good write
and read; after the last example ``store.check()`` is clean. A store whose part stopped serving is
reopened (same root), so one killing call cannot make every later example fail and mislead the
shrinker; a sweep replays its calls one at a time to name the one that killed it.

On a failure Hypothesis prints the drawn arguments and a ``@reproduce_failure`` blob (add it to the
inner ``example`` function to replay). ``PFORGE_HOSTILE_EXAMPLES`` sets the examples per method
(default 25; the default run stays under a minute).

Not drawn, on purpose (and ``EXCLUDED`` names the methods left out, each with its reason):
- Keywords a method does not have, and missing required arguments: Python refuses those calls itself
  with ``TypeError`` before any store code runs; that is the language's contract, not the store's.
- For a path parameter (annotated ``PathLike``): a str, bytes or Path is always under this test's
  sandbox directory, one component (any characters but ``/``; never ``.`` or ``..``) below it, and
  an int is never a small one: ``os`` functions take a small int as an open file descriptor (and
  -100 as the working directory), which could point ``restore`` at a real directory of this process.
- FIFOs and components swapped during a call: the workspace trust boundary has its own racing tests;
  a blocking ``open`` here would hang the store rather than fail one example.
"""

from __future__ import annotations

import datetime as dt
import enum
import inspect
import math
import os
import typing
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pforge_async import EMPTY_TREE, ActorClosed, PforgeError, Reservation, Store, Usage, open_store

EXAMPLES = int(os.environ.get("PFORGE_HOSTILE_EXAMPLES", "25"))
CALL_TIMEOUT = 30.0
PROBE_VENDOR = "hostile-probe-vendor"
PROBE_STATE = "hostile-probe-state"

Call = tuple[list[Any], dict[str, Any]]


# -- the methods -----------------------------------------------------------------------------------


def _parts() -> dict[str, type]:
    """Store's parts by attribute name, from its annotations (``cas: Cas``, ...)."""
    hints = typing.get_type_hints(Store)
    return {name: cls for name, cls in hints.items() if not name.startswith("_") and inspect.isclass(cls)}


def _public_methods(cls: type) -> list[str]:
    names = []
    for name, _ in inspect.getmembers(cls):
        if name.startswith("_"):
            continue
        static = inspect.getattr_static(cls, name)
        if isinstance(static, (property, classmethod, staticmethod)) or not callable(static):
            continue
        names.append(name)
    return names


def discover() -> list[str]:
    """``"<part>.<method>"`` for every public method of every part, and ``"store.<method>"``."""
    found = [f"{part}.{name}" for part, cls in _parts().items() for name in _public_methods(cls)]
    found += [f"store.{name}" for name in _public_methods(Store)]
    return sorted(found)


#: Methods not thrown values, and why. Each must still exist (checked below), so a rename is noticed.
EXCLUDED = {
    "store.aclose": "closes the store by contract, so nothing serves after it, and takes no argument; "
    "calls after a close are the lifecycle tests' concern",
}
METHODS = [m for m in discover() if m not in EXCLUDED]


def test_discovery_finds_every_part() -> None:
    parts = {m.split(".")[0] for m in METHODS}
    assert {"cas", "turns", "memory", "nonces", "budget", "store"} <= parts
    assert {"cas.snapshot", "turns.append_turn", "memory.best_action", "budget.totals", "store.check"} <= set(METHODS)
    assert set(EXCLUDED) <= set(discover()), "an excluded method no longer exists: drop it from EXCLUDED"


# -- the values ------------------------------------------------------------------------------------


class Colour(str, enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 7


SPECIAL_INTS = [0, 1, -1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 1e300, -1e300, 1e200, 1e16, 5e-324, -0.0, 0.5, 1e-300]
SPECIAL_STRS = [
    "",
    "\x00",
    "a\x00b",
    "\ud800",
    "ok\udfff",
    "\udcff",
    " ",
    "\n",
    ".",
    "..",
    "/",
    "../x",
    "refs/../../x",
    "a/b",
    ".git",
    "HEAD",
    "refs/heads/main",
    "0" * 64,
    "0" * 32,
    "g" * 64,
    "é",
    "\u200c",
    "\U0001f600",
]
SPECIAL_BYTES = [b"", b"\x00", b"\xff\xfe", b"\xed\xa0\x80"]
SPECIAL_OBJECTS: list[Any] = [
    object(),
    Path("/"),
    dt.datetime.min,
    dt.datetime.max,
    dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc),
    dt.timedelta(days=1),
    ValueError("x"),
    Colour.RED,
    Size.BIG,
    bytearray(b"ab"),
    memoryview(b"ab"),
    frozenset({"a"}),
    {"a", "b"},
    range(3),
    Ellipsis,
    NotImplemented,
    int,
]

#: One of each kind, for the sweep every parameter of every method gets before Hypothesis runs.
EDGE_VALUES: list[Any] = [
    None,
    True,
    *SPECIAL_INTS,
    10**400,
    *SPECIAL_FLOATS,
    *SPECIAL_STRS,
    "x" * 1025,
    "x" * 5000,
    *SPECIAL_BYTES,
    b"x" * 5000,
    *SPECIAL_OBJECTS,
    [],
    {},
    (),
    [None],
    ["\ud800"],
    [2**64],
    {"\ud800": 1},
    {"k": math.nan},
    {1: 2},
    ("a.txt", "100644", "0" * 64),
    [("a.txt", "100644", "0" * 64)],
    [("\ud800", 2**64, None)],
    Usage(-1, 0, 0),
    Usage(2**63, 0, 0),
    Usage("1", None, 1.5),  # type: ignore[arg-type]
    Reservation("0" * 32, "\ud800", "", 2**64, -1, 0),
    Reservation(None, None, None, None, None, None),  # type: ignore[arg-type]
]

#: Long values are built by ``map``, so the strategies' reprs in Hypothesis's reports stay short.
LONG = st.sampled_from([1024, 1025, 5000])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(SPECIAL_INTS),
    st.just(400).map(lambda n: 10**n),
    st.floats(),
    st.sampled_from(SPECIAL_FLOATS),
    st.text(max_size=20),
    st.text(st.characters(codec=None, categories=("Cs", "Cc", "Lu", "Nd")), max_size=8),  # Cs: lone surrogates
    st.sampled_from(SPECIAL_STRS),
    LONG.map(lambda n: "x" * n),
    st.binary(max_size=20),
    st.sampled_from(SPECIAL_BYTES),
    LONG.map(lambda n: b"x" * n),
    st.sampled_from(SPECIAL_OBJECTS),
)


def hostile(known: list[Any]) -> st.SearchStrategy[Any]:
    """Any value, sometimes one the store really holds, nested in containers and library structs."""
    leaves = st.one_of(scalars, st.sampled_from(known))
    keys = st.one_of(st.text(max_size=4), st.integers(), st.none(), st.sampled_from(SPECIAL_STRS))

    def nest(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(inner, max_size=4),
            st.tuples(inner, inner, inner),
            st.dictionaries(keys, inner, max_size=3),
            st.builds(Usage, inner, inner, inner),
            st.builds(Reservation, inner, inner, inner, inner, inner, inner),
        )

    return st.recursive(leaves, nest, max_leaves=6)


def sandboxed(sandbox: Path, known: list[Any]) -> st.SearchStrategy[Any]:
    """Values for a path parameter: see the module's docstring for why they are confined."""
    component = st.one_of(
        st.sampled_from(["", "ws", "ws/sub", "file.txt", "missing", "restored", "a\x00b", "\ud800"]),
        LONG.map(lambda n: "x" * n),
        st.text(min_size=1, max_size=12).filter(lambda s: "/" not in s and s not in (".", "..")),
        st.text(st.characters(codec=None, categories=("Cs", "Ll")), min_size=1, max_size=6).filter(
            lambda s: s not in (".", "..")
        ),
    )
    as_bytes = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b not in (b".", b".."))
    return st.one_of(
        component.map(lambda name: str(sandbox / name) if name else str(sandbox)),
        component.map(lambda name: sandbox / name),
        as_bytes.map(lambda name: os.fsencode(sandbox) + b"/" + name),
        st.none(),
        st.booleans(),
        st.integers(min_value=10**6),
        st.sampled_from([-1, -2, 2**31, 2**63, 2**64]),
        st.floats(),
        st.lists(st.text(max_size=3), max_size=2),
        st.sampled_from([object(), {}, Colour.RED]),
        st.sampled_from(known),
    )


def edge_paths(sandbox: Path) -> list[Any]:
    """One of each kind for a path parameter, confined as in ``sandboxed``."""
    return [
        str(sandbox),
        sandbox / "ws",
        str(sandbox / "file.txt"),
        str(sandbox / "missing"),
        str(sandbox / "a\x00b"),
        str(sandbox / "\ud800"),
        sandbox / "\udcff",
        str(sandbox / ("x" * 5000)),
        os.fsencode(sandbox) + b"/\xff",
        os.fsencode(sandbox / "ws"),
        None,
        True,
        -1,
        2**31,
        2**63,
        10**400,
        1.5,
        math.nan,
        [str(sandbox)],
        {},
        object(),
        Colour.RED,
    ]


def _is_path(parameter: inspect.Parameter) -> bool:
    return "PathLike" in str(parameter.annotation)


def _show_call(dotted: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    def short(value: Any) -> str:
        shown = repr(value)
        return shown if len(shown) <= 70 else f"{shown[:40]}...<{len(shown)} chars>"

    parts = [short(a) for a in args] + [f"{k}={short(v)}" for k, v in kwargs.items()]
    return f"{dotted}({', '.join(parts)})"


# -- the harness -----------------------------------------------------------------------------------


class Harness:
    """One store (reopened on the same root if a part stops serving), driven from the test's thread
    through a blocking portal into the event loop the store's actors run on."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, root: Path, sandbox: Path) -> None:
        self.portal = portal
        self.root = root
        self.sandbox = sandbox
        self._cm: AbstractContextManager[Store] | None = None
        self.store: Store
        self.probe_context = 0
        self.probes = 0
        #: every value the seeding used or got back, and the same by parameter name.
        self.known: list[Any] = []
        self.plausible: dict[str, list[Any]] = {}
        self.values: st.SearchStrategy[Any] = st.nothing()
        self.paths: st.SearchStrategy[Any] = st.nothing()

    def open(self) -> None:
        self._cm = self.portal.wrap_async_context_manager(open_store(self.root, durability="normal"))
        self.store = self._cm.__enter__()

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def reopen(self) -> None:
        self.close()
        self.open()

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return self.portal.call(fn, *args)

    # -- seeding -----------------------------------------------------------------------------------

    async def use(self, method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` and remember its arguments by parameter name, as plausible values."""
        for name, value in inspect.signature(method).bind(*args, **kwargs).arguments.items():
            self.remember(name, value)
        return await method(*args, **kwargs)

    def remember(self, name: str, *values: Any) -> None:
        for value in values:
            self.plausible.setdefault(name, []).append(value)
            self.known.append(value)

    async def seed(self) -> None:
        """Write a little of everything; remember the ids and names, by parameter, for the strategies."""
        store, use, remember = self.store, self.use, self.remember
        ws = self.sandbox / "ws"
        (ws / "sub").mkdir(parents=True)
        (ws / "a.txt").write_bytes(b"a")
        (ws / "sub" / "b.txt").write_bytes(b"b")
        (self.sandbox / "file.txt").write_bytes(b"not a directory")
        blob = await use(store.cas.write_blob, b"hello")
        tree = await use(store.cas.write_tree, [("a.txt", "100644", blob), ("d/b.txt", "100755", blob)])
        commit = await use(store.cas.write_commit, tree, (), message="seed", author="A <a@b>", timestamp=1)
        await use(store.cas.update_ref, "refs/heads/main", commit)
        snap = await use(store.cas.snapshot, ws)
        remember("oid", blob, tree, commit, snap, EMPTY_TREE)
        remember("tree", snap, EMPTY_TREE)
        remember("new", commit)
        remember("expected", commit)
        remember("parents", [commit], [tree])
        remember("fs_root", tree)
        context = await use(store.turns.create_context)
        turn = await use(store.turns.append_turn, context.context_id, "seed.type", b"payload", idempotency_key="k")
        fork = await use(store.turns.fork_context, turn.turn_id)
        await use(store.turns.publish_registry_bundle, "bundle", b"{}")
        remember("context_id", context.context_id, fork.context_id)
        remember("turn_id", turn.turn_id)
        remember("base_turn_id", turn.turn_id)
        remember("parent_turn_id", turn.turn_id)
        remember("before_turn_id", turn.turn_id)
        remember("limit", 1, 64)
        remember("bundle_id", "bundle")
        await use(store.memory.record_transition, "s", "a", "t", 1.0, True, context={"k": 1}, idempotency_key="k")
        remember("candidates", ["a", "b"])
        remember("exploration", 0.5)
        nonce = await use(store.nonces.issue, "subject", 600)
        remember("nonce", nonce)
        await use(store.budget.set_budget, "v", tokens=10**6, cost=10**9, window="day")
        await store.budget.set_budget(PROBE_VENDOR)
        reservation = await use(store.budget.reserve, "v", tokens=10, cost=10, model="m", ttl_s=600)
        await use(store.budget.record_spend, "v", "m", input_tokens=1, output_tokens=2, cost=3, idempotency_key="k")
        remember("reservation", reservation, reservation.reservation_id)
        remember("actual", Usage(1, 1, 1))
        remember("since", 0, dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc))
        remember("directory", str(ws), self.sandbox / "restored")
        self.probe_context = (await store.turns.create_context()).context_id
        self.values = hostile(self.known)
        self.paths = sandboxed(self.sandbox, self.known)

    # -- calls -------------------------------------------------------------------------------------

    async def call(self, dotted: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        part, name = dotted.split(".")
        target = self.store if part == "store" else getattr(self.store, part)
        with anyio.fail_after(CALL_TIMEOUT):
            result = getattr(target, name)(*args, **kwargs)
            if inspect.isawaitable(result):
                await result

    async def attempt(self, dotted: str, args: list[Any], kwargs: dict[str, Any]) -> BaseException | None:
        """What a call raised that it must not: anything but a ``PforgeError``, and ``ActorClosed``
        while the store is open. None if nothing."""
        try:
            await self.call(dotted, args, kwargs)
        except ActorClosed as exc:
            return exc
        except PforgeError:
            return None
        except Exception as exc:
            return exc
        return None

    async def probe(self) -> None:
        """A known-good write and read of each part."""
        self.probes += 1
        data = b"probe %d" % self.probes
        store = self.store
        with anyio.fail_after(CALL_TIMEOUT):
            assert await store.cas.read_blob(await store.cas.write_blob(data)) == data
            turn = await store.turns.append_turn(self.probe_context, "probe.type", data)
            assert (await store.turns.get_turn(turn.turn_id)).payload == data
            await store.memory.record_transition(PROBE_STATE, "act", "next", 0.5, True)
            (stats,) = await store.memory.stats(PROBE_STATE)
            assert stats.count >= 1
            nonce = await store.nonces.issue(PROBE_VENDOR, 60)
            await store.nonces.consume(nonce, PROBE_VENDOR)
            await store.budget.record_spend(PROBE_VENDOR, "m", input_tokens=1, output_tokens=1, cost=1)
            assert (await store.budget.totals(PROBE_VENDOR)).cost >= 1

    def serving(self) -> Exception | None:
        """None if the store serves; else why not, and the store is reopened."""
        try:
            self.run(self.probe)
        except Exception as exc:
            self.reopen()
            return exc
        return None

    # -- the sweep ---------------------------------------------------------------------------------

    def sweep(self, dotted: str, signature: inspect.Signature) -> list[str]:
        """Every edge value in every parameter, the other required parameters plausible, the
        optional ones left out. Returns what went wrong, one line per call."""
        params = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        found: list[str] = []
        for target in params:
            calls = [
                self._with(params, target, v) for v in (edge_paths(self.sandbox) if _is_path(target) else EDGE_VALUES)
            ]
            for args, kwargs in calls:
                error = self.run(self.attempt, dotted, args, kwargs)
                if error is not None:
                    found.append(f"{_show_call(dotted, args, kwargs)} raised {error!r}")
            if self.serving() is not None:
                found += self._killers(dotted, calls)
        return found

    def _with(self, params: list[inspect.Parameter], target: inspect.Parameter, value: Any) -> Call:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        positional = True  # once one is left out, the rest go by keyword
        for p in params:
            if p is target:
                given = value
            elif p.default is p.empty:
                given = self.plausible.get(p.name, [None])[0]
            elif p.kind is p.POSITIONAL_ONLY:  # cannot be left out if a later one is given
                given = p.default
            else:
                positional = False
                continue
            if p.kind is p.KEYWORD_ONLY or not positional:
                kwargs[p.name] = given
            else:
                args.append(given)
        return args, kwargs

    def _killers(self, dotted: str, calls: list[Call]) -> list[str]:
        """A part stopped serving during a parameter's sweep: replay the calls one at a time."""
        found = []
        for args, kwargs in calls:
            self.run(self.attempt, dotted, args, kwargs)
            why = self.serving()
            if why is not None:
                found.append(f"{_show_call(dotted, args, kwargs)} left the store not serving: {why!r}")
        return found or [f"{dotted}: the store stopped serving during a sweep; no single call does it alone"]

    # -- one Hypothesis example ----------------------------------------------------------------------

    def example(self, dotted: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        failure = self.run(self.attempt, dotted, args, kwargs)
        why = self.serving()
        if why is not None:
            raise AssertionError(f"the store stopped serving after this call: {why!r}") from failure
        if failure is not None:
            raise failure

    def draw_call(self, data: st.DataObject, signature: inspect.Signature) -> Call:
        """Arguments for one call. Most examples make one parameter hostile and give the others values
        the store really holds, so the hostile one gets past the other arguments' checks; the rest
        draw every parameter from everything."""
        params = list(signature.parameters.values())
        target = data.draw(st.integers(-1, len(params) - 1), label="hostile parameter (-1: all)") if params else -1
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        positional = True  # once one is left out or given by keyword, the rest go by keyword
        for i, p in enumerate(params):
            anything = self.paths if _is_path(p) else self.values
            good = self.plausible.get(p.name)
            if i == target or not good:
                strategy = anything
            elif target == -1:
                strategy = st.one_of(st.sampled_from(good), anything)
            else:
                strategy = st.sampled_from(good)
            if p.kind is p.VAR_POSITIONAL:
                if positional:
                    args += data.draw(st.lists(strategy, max_size=2), label=f"*{p.name}")
                continue
            if p.kind is p.VAR_KEYWORD:
                extra = st.dictionaries(st.text(min_size=1, max_size=5), strategy, max_size=2)
                kwargs |= data.draw(extra, label=f"**{p.name}")
                continue
            optional = p.default is not p.empty and p.kind is not p.POSITIONAL_ONLY
            if optional and i != target and not data.draw(st.booleans(), label=f"give {p.name}"):
                positional = False
                continue
            value = data.draw(strategy, label=p.name)
            by_keyword = p.kind is p.KEYWORD_ONLY or (
                p.kind is p.POSITIONAL_OR_KEYWORD and (not positional or data.draw(st.booleans(), label=f"{p.name}="))
            )
            if by_keyword:
                positional = False
                kwargs[p.name] = value
            else:
                args.append(value)
        signature.bind(*args, **kwargs)  # raises only for a bug of this test, never for the store's
        return args, kwargs


@contextmanager
def harness(tmp_path: Path) -> Iterator[Harness]:
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        sandbox = tmp_path / "sandbox"
        sandbox.mkdir()
        h = Harness(portal, tmp_path / ".pforge", sandbox)
        h.open()
        try:
            h.run(h.seed)
            yield h
        finally:
            h.close()


@pytest.mark.parametrize("dotted", METHODS)
def test_hostile_arguments_raise_only_pforge_errors(
    tmp_path: Path, dotted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative path the strategies produce (a str enum member, say) lands in the sandbox, never
    # in the checkout the tests run from.
    monkeypatch.chdir(tmp_path)
    with harness(tmp_path) as h:
        part, name = dotted.split(".")
        signature = inspect.signature(getattr(h.store if part == "store" else getattr(h.store, part), name))
        # The sweep lists every failing edge value at once, where Hypothesis stops at the first
        # failure it finds; Hypothesis then looks for what the sweep cannot: combinations, nesting.
        found = h.sweep(dotted, signature)
        assert not found, f"{len(found)} hostile calls to {dotted} failed:\n" + "\n".join(found)

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(data=st.data())
        def example(data: st.DataObject) -> None:
            args, kwargs = h.draw_call(data, signature)
            h.example(dotted, args, kwargs)

        example()
        report = h.run(h.store.check)
        assert report.ok, f"store.check() after hostile calls to {dotted}: {report.problems}"

"""Typed method specs: one frozen dataclass per decoding method, owning its options' defaults,
validation and documentation, and building its proposer.

    specdec.generate(model, prompts, method=PromptLookup(k=2))   # or method="prompt_lookup", k=2

A method is a subclass of :class:`MethodSpec` decorated with :func:`register`; its fields are its
options (each declared with :func:`option`), from which the command line's flags and the API's
keyword shorthands are generated. The core defines this interface; each method lives beside its
proposer (``drafts/``, ``heads/``) and registers itself when imported, and the API layer
(:mod:`specdec.methods`) imports them all. Docs: docs/design.md ("adding a method").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

import numpy as np

from specdec.budget import with_budget
from specdec.engine import RULES, ByLoad, whole_number

DEFAULT_K = 4  # draft tokens per step of every chain-drafting method, unless given


def option(default: Any, help: str, *, cli: Callable | None = int, by_load: bool = False, choices=None):
    """A method option: a dataclass field with its ``default``, one line of ``help`` (shown by the
    CLI and the docs), the CLI's type (``cli``; None: Python only), whether it may be given by load
    (``{running rows: value}``, CLI ``ROWS:VALUE,...``) and the values it takes (``choices``)."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli, "by_load": by_load,
                                                        "choices": choices})


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """A decoding method and its options. Subclasses set ``name`` (the API's ``method=`` string),
    ``lossless`` (returns exactly what autoregressive decoding returns), ``summary`` (one line) and,
    where ``specdec tune`` can pick it by load, ``tuned`` (the option) and ``tune_choices``."""

    name: ClassVar[str]
    lossless: ClassVar[bool]
    summary: ClassVar[str]
    tuned: ClassVar[str | None] = None
    tune_choices: ClassVar[tuple] = ()

    def build(self, target) -> tuple[Any, Any] | None:
        """``(proposer, proposer params)`` for ``target`` (a ``LoadedModel``); None: the method runs
        its own loop (autoregressive decoding, SkipDecode, superposed decoding)."""
        return None

    def options(self) -> dict[str, Any]:
        """Every option's value, defaults included."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping) and not f.metadata.get("by_load"):
                raise ValueError(f"{f.name} takes one value, not one by load ({{running rows: value}})")
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ValueError(f"unknown {f.name} {value!r}; known: {', '.join(map(str, choices))}")


REGISTRY: dict[str, type[MethodSpec]] = {}


def register(cls: type[MethodSpec]) -> type[MethodSpec]:
    """Class decorator: make ``cls`` a method of ``generate``, the CLI and ``tune`` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, MethodSpec)) or not getattr(cls, "name", None):
        raise TypeError(f"register takes a MethodSpec subclass with a name, got {cls!r}")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is registered already ({REGISTRY[cls.name].__qualname__})")
    REGISTRY[cls.name] = cls
    return cls


def method_spec(method: str | MethodSpec, options: Mapping[str, Any] | None = None) -> MethodSpec:
    """The spec for ``method``: a spec itself, or a registered name with keyword ``options`` (None
    values: the method's default). Raises ValueError for an unknown method, an option the method
    does not take, or options given beside a spec."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if isinstance(method, MethodSpec):
        if given:
            raise ValueError(f"options {sorted(given)} were given beside method={method!r}: set them in the spec "
                             f"(e.g. dataclasses.replace(spec, ...)) or pass method={method.name!r} with them")
        return method
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(REGISTRY)}")
    cls = REGISTRY[method]
    foreign = set(given) - set(cls.option_names())
    if foreign:
        raise ValueError(f"method {method!r} does not take option(s) {sorted(foreign)}; "
                         f"it takes {list(cls.option_names()) or 'none'}")
    return cls(**given)


def all_options(methods: Iterable[str] | None = None) -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """``{option: [(method, its field), ...]}`` over the registered ``methods`` (default: all), in
    declaration order: what ``generate`` accepts as keywords and the CLI turns into flags."""
    out: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name in REGISTRY if methods is None else methods:
        for f in dataclasses.fields(REGISTRY[name]):
            out.setdefault(f.name, []).append((name, f))
    return out


@register
@dataclass(frozen=True, kw_only=True)
class Autoregressive(MethodSpec):
    """Plain decoding of the target, the reference every lossless method equals."""

    name: ClassVar[str] = "autoregressive"
    lossless: ClassVar[bool] = True
    summary: ClassVar[str] = "plain decoding of the target: the reference"
    block_width: int = option(1, "tokens per forward in a causal block (the same tokens; for measuring c(k))")

    def __post_init__(self):
        super().__post_init__()
        whole_number(self.block_width, "block_width", 1)


@dataclass(frozen=True, kw_only=True)
class Speculative(MethodSpec):
    """Options of every method verified by the shared verification module."""

    lossless: ClassVar[bool] = True
    verification: str = option("exact", "exact (greedy/coupled, seed-identical to autoregressive), rejection "
                               "(lossless in distribution) or typical (LOSSY)", cli=str, choices=RULES)
    profile: bool = option(False, "time proposing and verifying apart (stats.proposer_s, stats.target_s)", cli=None)


@dataclass(frozen=True, kw_only=True)
class Budgeted(Speculative):
    budget: int | None = option(None, "draft tokens verified per step, all rows together: those the proposer "
                                "rates likeliest to be accepted (default: all)", by_load=True)


@dataclass(frozen=True, kw_only=True)
class WithLookup(Budgeted):
    lookup: int = option(0, "also propose this many prompt-lookup tokens beside the tree, verified in the same "
                         "forward")
    lookup_width: int = option(1, "lookup chains copied from distinct matches")


@dataclass(frozen=True, kw_only=True)
class DraftTree(WithLookup):
    """A draft that grows a tree of candidates: k deep, ``draft_width`` per depth, ``draft_branches``
    chains below the root."""

    k: int | dict | None = option(DEFAULT_K, "draft tokens per step (0 turns speculation off)", by_load=True)
    draft_width: int | dict | None = option(1, "candidates per depth", by_load=True)
    draft_branches: int | None = option(1, "a chain of k below each of the root's this many likeliest children "
                                        "(one value: by-load proposers share the draft's cache)")


def schedule(value) -> dict:
    """A by-load option as ``{running rows: value}`` (a single value: from 1 row)."""
    if not isinstance(value, Mapping):
        return {1: value}
    if any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) for r in value):
        raise ValueError(f"a by-load option maps running-row counts (integers) to values, got keys {list(value)}")
    if 1 not in value:
        raise ValueError(f"a by-load option needs values starting at 1 running row (key 1), got keys {sorted(value)}")
    return {int(r): v for r, v in value.items()}


def build_by_load(build: Callable, budget=None, **scheduled) -> tuple[Any, Any]:
    """``build(**scheduled) -> (proposer, params)``, each proposer verifying at most ``budget`` draft
    tokens per step across the batch (None: all). Where ``budget`` or a value of ``scheduled`` (k,
    width, tree) is a ``{running rows: value}`` mapping, a :class:`specdec.engine.ByLoad` with one
    proposer per row count any of them names (they share the first one's params)."""
    if not any(isinstance(v, Mapping) for v in (budget, *scheduled.values())):
        return with_budget(build(**scheduled), budget)
    schedules, budgets = {name: schedule(v) for name, v in scheduled.items()}, schedule(budget)

    def at(values: dict, rows: int):
        return values[max(r for r in values if r <= rows)]

    built = [(r, with_budget(build(**{name: at(v, r) for name, v in schedules.items()}), at(budgets, r)))
             for r in sorted(set(budgets).union(*schedules.values()))]
    return ByLoad(tuple((r, proposer) for r, (proposer, _) in built)), built[0][1][1]

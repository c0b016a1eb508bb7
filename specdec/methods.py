"""Method names -> proposers: the one place that maps the API's ``method=`` to a proposer.

Each entry takes the target (a ``LoadedModel``) and the caller's method options
and returns ``(proposer, proposer params)``; ``autoregressive`` has no proposer.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

METHOD_OPTIONS = {
    "autoregressive": ("block_width",),
    "draft": ("draft", "k", "draft_width", "draft_branches", "lookup", "lookup_width", "budget", "verification",
              "profile"),
    "prompt_lookup": ("k", "max_ngram", "min_ngram", "draft_width", "budget", "verification", "profile"),
    "medusa": ("heads", "tree", "head_vocab", "lookup", "lookup_width", "budget", "verification", "profile"),
    "eagle": ("feature_draft", "k", "draft_width", "draft_branches", "tree", "lookup", "lookup_width", "budget",
              "verification", "profile"),
    "early_exit": ("exit_layer", "k", "verification", "profile"),
    "skipdecode": ("target_speedup", "warmup_layers", "min_active", "max_active", "weights"),
    "superposed": ("num_drafts", "ngrams", "alpha", "tau", "n_token_sample", "ngram_weights", "reset_every"),
}
METHODS = tuple(METHOD_OPTIONS)


def _opt(options: dict, name: str, default):
    value = options.get(name)
    return default if value is None else value


def _schedule(value) -> dict:
    """A by-load option as ``{running rows: value}`` (a single value: from 1 row)."""
    if not isinstance(value, Mapping):
        return {1: value}
    if any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) for r in value):
        raise ValueError(f"a by-load option maps running-row counts (integers) to values, got keys {list(value)}")
    if 1 not in value:
        raise ValueError(f"a by-load option needs values starting at 1 running row (key 1), got keys {sorted(value)}")
    return {int(r): v for r, v in value.items()}


def _by_load(build: Callable, budget=None, **scheduled) -> tuple[Any, Any]:
    """``build(**scheduled) -> (proposer, params)``, each proposer verifying at most ``budget`` draft
    tokens per step across the batch (None: all). Where ``budget`` or a value of ``scheduled`` (k,
    width, tree) is a ``{running rows: value}`` mapping, a :class:`specdec.engine.ByLoad` with one
    proposer per row count any of them names (they share the first one's params)."""
    from specdec.budget import with_budget

    if not any(isinstance(v, Mapping) for v in (budget, *scheduled.values())):
        return with_budget(build(**scheduled), budget)
    from specdec.engine import ByLoad

    schedules, budgets = {name: _schedule(v) for name, v in scheduled.items()}, _schedule(budget)

    def at(schedule: dict, rows: int):
        return schedule[max(r for r in schedule if r <= rows)]

    built = [(r, with_budget(build(**{name: at(v, r) for name, v in schedules.items()}), at(budgets, r)))
             for r in sorted(set(budgets).union(*schedules.values()))]
    return ByLoad(tuple((r, proposer) for r, (proposer, _) in built)), built[0][1][1]


def _draft(target, options: dict) -> tuple[Any, Any]:
    from pathlib import Path

    from drafts.draft_model import draft_proposer
    from drafts.saved import CONFIG_FILE, draft_for
    from specdec.config import precision_name
    from specdec.loading import LoadedModel, load
    from specdec.union import with_lookup

    draft = options.get("draft")
    if draft is None or (not isinstance(draft, LoadedModel) and (Path(draft) / CONFIG_FILE).is_file()):
        draft = draft_for(target, draft)[0]  # the bundled draft, or one saved by `specdec train-draft`
    elif not isinstance(draft, LoadedModel):
        draft = load(draft, precision=precision_name(target.config))
    k, (width, branches), (lookup, lookup_width) = _opt(options, "k", 4), _tree_shape(options), _lookup(options)
    deepest = max(_schedule(k).values())  # every proposer of a by-load schedule shares the draft's cache
    return _by_load(lambda k, width: with_lookup(
        draft_proposer(target.config, draft.config, draft.graphdef, k=k, width=width, branches=branches,
                       deepest=deepest), draft.state, lookup, width=lookup_width),
        options.get("budget"), k=k, width=width)


def _tree_shape(options: dict) -> tuple[Any, int]:
    """A draft tree's ``draft_width`` (by load or one value) and ``draft_branches`` (one value: the
    proposers of a by-load schedule share the draft's cache, which a branched step leaves holding only
    its first chain)."""
    branches = _opt(options, "draft_branches", 1)
    if isinstance(branches, Mapping):
        raise ValueError("draft_branches takes one value, not one by load (draft_width and k may vary by load)")
    return _opt(options, "draft_width", 1), branches


def _prompt_lookup(target, options: dict) -> tuple[Any, Any]:
    from drafts.prompt_lookup import PromptLookupProposer
    from specdec.engine import draft_width

    ngrams = dict(max_ngram=_opt(options, "max_ngram", 3), min_ngram=_opt(options, "min_ngram", 1))
    return _by_load(lambda k, width: (PromptLookupProposer(k=k, width=draft_width(width, target.config.vocab_size),
                                                           **ngrams), None),
                    options.get("budget"), k=_opt(options, "k", 4), width=_opt(options, "draft_width", 1))


def _lookup(options: dict) -> tuple[int, int]:
    """The ``lookup`` and ``lookup_width`` options: tokens per prompt-lookup chain and chains proposed
    beside the method's own tree (lookup 0: none)."""
    from specdec.engine import whole_number
    from specdec.union import LOOKUP

    lookup, width = _opt(options, "lookup", 0), _opt(options, "lookup_width", 1)
    if isinstance(lookup, Mapping) or isinstance(width, Mapping):
        raise ValueError("lookup and lookup_width (prompt lookup beside the tree) take one value, not one by load")
    return whole_number(lookup, LOOKUP), whole_number(width, "lookup_width (prompt-lookup chains beside the tree)", 1)


def _medusa(target, options: dict) -> tuple[Any, Any]:
    from heads.bundled import default_head_vocab, default_trees, heads_for
    from heads.medusa import MedusaHeads, head_vocab_ids
    from heads.proposer import medusa_proposer
    from heads.trees import load_spec
    from specdec.union import with_lookup

    heads, heads_dir = options.get("heads"), None
    if not isinstance(heads, MedusaHeads):
        heads, heads_dir = heads_for(target, heads)
    tree = options.get("tree")
    if tree is None:  # only then read the searched trees beside the heads
        tree = default_trees(heads_dir)
    vocab = head_vocab_ids(target, _opt(options, "head_vocab", default_head_vocab(heads_dir)), heads_dir)
    lookup, width = _lookup(options)
    return _by_load(lambda tree: with_lookup(*medusa_proposer(target, heads, load_spec(tree), vocab), lookup,
                                             width=width), options.get("budget"), tree=tree)


def _eagle(target, options: dict) -> tuple[Any, Any]:
    from flax import nnx

    from heads.feature_draft import FeatureDraft, feature_draft_for
    from heads.feature_proposer import feature_draft_proposer
    from specdec.union import with_lookup

    draft = options.get("feature_draft")
    if not isinstance(draft, FeatureDraft):
        draft = feature_draft_for(target, draft)  # the bundled one, or one saved by `specdec train-feature-draft`
    lookup, lookup_width = _lookup(options)
    tree = options.get("tree")
    if tree is not None:  # a tree of draft ranks, by load or one
        if any(options.get(name) is not None for name in ("k", "draft_width", "draft_branches")):
            raise ValueError("method 'eagle' takes a tree (of draft ranks) or k / draft_width / draft_branches, "
                             "not both: drop one")
        from heads.trees import load_spec

        depth = max(max((len(p) for p in load_spec(t)), default=0) for t in _schedule(tree).values())
        return _by_load(lambda tree: with_lookup(
            feature_draft_proposer(target, draft, tree=tree, span=max(depth, lookup) + 1), nnx.state(draft),
            lookup, width=lookup_width), options.get("budget"), tree=tree)
    k, (width, branches) = _opt(options, "k", 4), _tree_shape(options)
    span = max(*_schedule(k).values(), lookup) + 1  # one state layout for every tree of a by-load schedule
    return _by_load(lambda k, width: with_lookup(
        feature_draft_proposer(target, draft, k=k, width=width, branches=branches, span=span), nnx.state(draft),
        lookup, width=lookup_width), options.get("budget"), k=k, width=width)


def _early_exit(target, options: dict) -> tuple[Any, Any]:
    from drafts.early_exit import early_exit_proposer

    exit_layer = _opt(options, "exit_layer", target.config.n_layers // 2)
    return _by_load(lambda k: (early_exit_proposer(target.config, target.graphdef, exit_layer=exit_layer, k=k),
                               target.state), k=_opt(options, "k", 4))


_BUILDERS: dict[str, Callable] = {"draft": _draft, "prompt_lookup": _prompt_lookup, "medusa": _medusa,
                                  "eagle": _eagle, "early_exit": _early_exit}


def build_proposer(method: str, target, options: dict) -> tuple[Any, Any] | None:
    """``(proposer, params)`` for ``method``, or None for autoregressive decoding (and SkipDecode,
    which runs the autoregressive loop with a layer schedule: :func:`specdec.skipdecode.schedule_for`,
    and superposed decoding, :func:`specdec.superposed.superposed_decode`).

    Raises ValueError for an unknown method or an option the method does not take.
    """
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    given = {k for k, v in options.items() if v is not None}
    foreign = given - set(METHOD_OPTIONS[method])
    if foreign:
        raise ValueError(f"method {method!r} does not take option(s) {sorted(foreign)}; "
                         f"it takes {list(METHOD_OPTIONS[method]) or 'none'}")
    if method in ("autoregressive", "skipdecode", "superposed"):
        return None
    from specdec.engine import RULES

    rule = options.get("verification")
    if rule is not None and rule not in RULES:
        raise ValueError(f"unknown verification rule {rule!r}; known: {', '.join(RULES)}")
    return _BUILDERS[method](target, options)

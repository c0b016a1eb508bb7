"""The speculative engine: propose -> one target forward over the tree -> verify -> commit.

Every lossless method is a :class:`Proposer`; the loop here never changes for a
new one. Rows of a batch keep their own committed length, position, accepted
count, token budget and stop state at every step: the target writes each row's
candidates at that row's length, accepted tree paths are compacted into
contiguous slots, and ``lengths`` only advance past what was accepted, so
rejected entries are never read (rollback is free). The loop runs on device in
``lax.while_loop`` chunks; the host reads the state between chunks.
"""

from __future__ import annotations

import functools
import numbers
import time
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from specdec.autoregressive import (DecodeShapes, DecodeState, StepConfig, chunk_loop, prefill_with_hidden,
                                    prompt_arrays, run_chunks)
from specdec.cache import KVCache
from specdec.model import ForwardOutput, Segment, forward, forward_together
from specdec.sampling import Sampling
from specdec.tree import Tree
from specdec.verify import Verdict, node_positions, target_choices, verify_exact, verify_rejection, verify_typical

RULES = ("exact", "rejection", "typical")
"""Verification rules: ``exact`` (greedy, or coupled sampling: seed-identical to autoregressive),
``rejection`` (lossless speculative sampling), ``typical`` (Medusa typical acceptance, LOSSY)."""


class Proposal(NamedTuple):
    tokens: jax.Array  # [B, N - 1] tokens of nodes 1 .. N - 1 of the proposer's tree
    draft_probs: jax.Array | None  # [B, N, V] distribution each node was drawn from (rule "rejection"), or None
    # A proposer that runs the target's own bottom layers (early exit) hands back the target cache
    # with their K/V written for nodes 0 .. N - 1, and the residual stream [B, N, d] leaving them:
    # verification then runs only layers ``proposer.verify_from`` and up.
    cache: KVCache | None = None
    hidden: jax.Array | None = None
    # [B, N - 1] the chance each node's token is accepted if its parent is (a budget ranks by it)
    confidence: jax.Array | None = None
    # budgeted (specdec.budget): the nodes verified, kept [B, N] bool, and the tokens the target
    # computes, packed [K] flat indices ``row * N + node``; a node not kept is rejected outright
    kept: jax.Array | None = None
    packed: jax.Array | None = None


def no_proposal(batch: int) -> Proposal:
    """No candidates (``tokens: [B, 0]``): the step verifies the root alone, speculation off."""
    return Proposal(tokens=jnp.zeros((batch, 0), jnp.int32), draft_probs=None)


def whole_number(value, what: str, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an int, or a clear error naming ``what`` unless it is an integer in [minimum, maximum]."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{what} must be an integer {bound}, got {value!r}")
    return int(value)


def draft_length(k, minimum: int = 0) -> int:
    """``k`` (draft tokens per step) as an int, or a clear error unless it is an integer >= ``minimum``."""
    return whole_number(k, "k (draft tokens per step" + ("; 0: speculation off)" if minimum == 0 else ")"), minimum)


def draft_width(width, vocab_size: int) -> int:
    """``width`` (candidates per depth) as an int, or a clear error unless it is in [1, vocab_size]."""
    return whole_number(width, "draft_width (candidates per depth)", 1, vocab_size)


def draft_branches(branches, vocab_size: int) -> int:
    """``branches`` (chains below the root's likeliest children) as an int, or a clear error unless it
    is in [1, vocab_size]."""
    return whole_number(branches, "draft_branches (chains below the root's likeliest children)", 1, vocab_size)


class View(NamedTuple):
    """What a proposer may read at the start of a step."""

    history: jax.Array  # [B, H] every token by sequence position (prompt and generated)
    lengths: jax.Array  # [B] committed target length = the root's position
    last: jax.Array  # [B] the root token (newest, not yet in the target cache)
    seeds: jax.Array  # [B] uint32 row seeds
    cache: KVCache  # the target's cache (a proposer that writes to it returns it in its Proposal)
    active: jax.Array  # [B] bool rows still decoding


class Commit(NamedTuple):
    """What a proposer learns after verification."""

    verdict: Verdict
    lengths: jax.Array  # [B] committed target length after the step (the new root's position)
    target: ForwardOutput  # the target forward over the tree (final hidden [B, N, d], logits)
    active: jax.Array  # [B] rows that took part in the step


class Proposer(Protocol):
    """A source of candidate tokens. Frozen and hashable (it is a static jit argument);
    parameters and state are pytrees passed alongside it."""

    tree: Tree
    # optional ``verify_from: int``: the layer verification starts at when proposals carry ``hidden``

    def prefill(self, params: Any, tokens: jax.Array, prompt_lens: jax.Array, capacity: int, hidden: jax.Array) -> Any:
        """Proposer state after the padded prompts ``tokens: [B, P]``; ``hidden: [B, P, d]`` holds the
        target's final-normed hidden states at every prompt position."""

    def propose(self, params: Any, state: Any, view: View, sampling: Sampling, rule: str) -> tuple[Any, Proposal]:
        """Candidates for the tree's non-root nodes."""

    def commit(self, params: Any, state: Any, commit: Commit) -> Any:
        """Roll the proposer's state forward to the accepted path."""


@dataclass(frozen=True)
class ByLoad:
    """Proposers chosen by load: at each chunk's start, with ``r`` rows running, the proposer of the
    last ``(rows, proposer)`` step with ``rows <= r`` runs the chunk (steps ascending, the first from
    1 row). Verifying fewer candidates per row as the batch grows keeps the target forward cheap
    where it turns compute-bound; where a one-row forward is far cheaper than a few-row one (CPU:
    matrix-vector products), the first entry may turn speculation off instead (see
    experiments/bench_step_cost.py). The proposers must share params and state layout (e.g. one
    draft or prompt lookup with several k, or one set of Medusa heads with several trees)."""

    steps: tuple[tuple[int, Any], ...]

    def __post_init__(self) -> None:
        rows = [r for r, _ in self.steps]
        if not rows or rows[0] != 1 or rows != sorted(set(rows)):
            raise ValueError(f"a by-load schedule needs distinct ascending row counts starting at 1, got {rows}")

    def pick(self, running: int):
        return [p for r, p in self.steps if r <= max(running, 1)][-1]

    @property
    def tree(self) -> Tree:
        """The largest tree of the schedule (what shapes are planned for)."""
        return max((p.tree for _, p in self.steps), key=lambda t: t.size)

    @property
    def max_depth(self) -> int:
        return max(p.tree.max_depth for _, p in self.steps)


def by_load(proposer) -> ByLoad:
    """``proposer`` as a schedule (a single proposer runs at every load)."""
    return proposer if isinstance(proposer, ByLoad) else ByLoad(((1, proposer),))


@struct.dataclass
class SpecState:
    dec: DecodeState  # target cache, root token, outputs, budgets, stop state
    history: jax.Array  # [B, slots] tokens by position
    proposer: Any  # the proposer's state (e.g. a draft KV cache)
    row_forwards: jax.Array  # [B] target forwards each row took part in
    accepted_hist: jax.Array  # [B, D + 1] how often a step accepted 0 .. D draft tokens


def _compact(cache: KVCache, path: jax.Array, n: jax.Array) -> KVCache:
    """Move the accepted path's K/V (slots ``lengths + path[j]``) to slots ``lengths + j``, all layers."""
    b, width = path.shape
    rows = jnp.arange(b)[:, None]
    src = cache.lengths[:, None] + path
    j = jnp.arange(width)[None, :]
    dst = jnp.where(j <= n[:, None], cache.lengths[:, None] + j, cache.capacity)  # past the path: dropped
    return cache.map_layers(lambda x: x.at[rows, :, dst].set(x[rows, :, src], mode="drop"))


def _verify(tree: Tree, rule: str, sampling: Sampling, tokens, logits, prop: Proposal, seeds, lengths) -> Verdict:
    if rule == "rejection" and not sampling.greedy:
        return verify_rejection(tree, tokens, sampling.log_probs(logits), prop.draft_probs, seeds, lengths)
    choices = target_choices(sampling, logits, seeds, node_positions(tree, lengths))
    if rule == "typical":
        return verify_typical(tree, tokens, sampling.log_probs(logits), choices)
    return verify_exact(tree, tokens, choices)


def _emit(st: SpecState, verdict: Verdict, tokens: jax.Array, active: jax.Array,
          eos_ids: tuple[int, ...]) -> SpecState:
    """Record the accepted tokens and the target's next token (cut at EOS and at each row's budget)."""
    dec = st.dec
    n = verdict.n_accepted
    width = verdict.path.shape[1]
    j = jnp.arange(width)[None, :]
    path_tokens = jnp.take_along_axis(tokens, verdict.path, axis=1)
    emitted = jnp.where(j < n[:, None], jnp.roll(path_tokens, -1, axis=1), verdict.next_token[:, None])
    is_eos = jnp.isin(emitted, jnp.asarray(eos_ids, jnp.int32)) & (j <= n[:, None])
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), width)
    count = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), dec.max_new - dec.n_out)
    count = jnp.where(active, count, 0)
    rows = jnp.arange(tokens.shape[0])[:, None]
    keep = j < count[:, None]
    out = dec.out.at[rows, jnp.where(keep, dec.n_out[:, None] + j, dec.out.shape[1])].set(emitted, mode="drop")
    hist_at = jnp.where(keep, dec.cache.lengths[:, None] + 1 + j, st.history.shape[1])
    history = st.history.at[rows, hist_at].set(emitted, mode="drop")
    n_out = dec.n_out + count
    done = dec.done | (active & ((first_eos <= n) | (n_out >= dec.max_new)))
    last = jnp.where(active, jnp.take_along_axis(emitted, n[:, None], axis=1)[:, 0], dec.last)
    return st.replace(dec=dec.replace(out=out, n_out=n_out, done=done, last=last), history=history)


def propose_part(graphdef, params, proposer, pparams, st: SpecState, sampling: Sampling, rule: str):
    """The proposer's half of a step: ``(proposer state, Proposal)``."""
    d = st.dec
    view = View(history=st.history, lengths=d.cache.lengths, last=d.last, seeds=d.seeds, cache=d.cache,
                active=~d.done)
    return proposer.propose(pparams, st.proposer, view, sampling, rule)


def verify_segment(tree: Tree, dec: DecodeState, prop: Proposal) -> Segment:
    """The target's forward over each row's tree: its root (the newest token) and the proposal."""
    tokens = jnp.concatenate([dec.last[:, None], prop.tokens.astype(jnp.int32)], axis=1)
    return Segment(cache=dec.cache, tokens=tokens, positions=node_positions(tree, dec.cache.lengths),
                   block_mask=jnp.asarray(tree.ancestors), packed=prop.packed)


def verify_part(graphdef, params, proposer, pparams, st: SpecState, pstate, prop: Proposal, sampling: Sampling,
                rule: str, eos_ids: tuple[int, ...]) -> SpecState:
    """The target's half of a step: one forward over the tree, verify, commit."""
    model = nnx.merge(graphdef, params)
    seg = verify_segment(proposer.tree, st.dec, prop)
    if prop.hidden is None:
        (res,) = forward_together(model, [seg])
    else:
        res = forward(model, prop.cache, embeds=prop.hidden, layers=range(proposer.verify_from, model.config.n_layers),
                      positions=seg.positions, block_mask=seg.block_mask)
    return verified(proposer, pparams, st, pstate, prop, seg.tokens, res, sampling, rule, eos_ids)


def verified(proposer, pparams, st: SpecState, pstate, prop: Proposal, tokens: jax.Array, res: ForwardOutput,
             sampling: Sampling, rule: str, eos_ids: tuple[int, ...]) -> SpecState:
    """The step after the target's forward ``res`` over the tree ``tokens: [B, N]``: verify, emit, commit."""
    tree = proposer.tree
    dec = st.dec
    active = ~dec.done
    lengths = dec.cache.lengths
    checked = tokens if prop.kept is None else jnp.where(prop.kept, tokens, -1)  # -1: never the target's choice
    verdict = _verify(tree, rule, sampling, checked, res.logits, prop, dec.seeds, lengths)
    n = verdict.n_accepted
    cache = res.cache if tree.is_chain else _compact(res.cache, verdict.path, n)
    st = _emit(st, verdict, tokens, active, eos_ids)
    new_lengths = lengths + jnp.where(active, n + 1, 0)
    st = st.replace(dec=st.dec.replace(cache=cache.with_lengths(new_lengths), forwards=dec.forwards + 1))
    pstate = proposer.commit(pparams, pstate, Commit(verdict=verdict, lengths=new_lengths, target=res, active=active))
    hist = st.accepted_hist.at[jnp.arange(n.shape[0]), n].add(active.astype(jnp.int32))
    return st.replace(proposer=pstate, row_forwards=st.row_forwards + active, accepted_hist=hist)


_STATIC = ("graphdef", "proposer", "sampling", "rule", "eos_ids")


@functools.partial(jax.jit, static_argnames=_STATIC + ("end_on_finish",), donate_argnames=("st",))
def spec_chunk(graphdef, params, proposer, pparams, st: SpecState, steps, *, sampling: Sampling, rule: str,
               eos_ids: tuple[int, ...], end_on_finish: bool = False) -> SpecState:
    """Up to ``steps`` speculative steps for every unfinished row, on device (``end_on_finish``:
    see :func:`specdec.autoregressive.chunk_loop`)."""

    def body(st):
        pstate, prop = propose_part(graphdef, params, proposer, pparams, st, sampling, rule)
        return verify_part(graphdef, params, proposer, pparams, st, pstate, prop, sampling, rule, eos_ids)

    return chunk_loop(body, st, steps, lambda st: st.dec.done, end_on_finish)


@functools.partial(jax.jit, static_argnames=("graphdef", "proposer", "shapes", "sampling", "eos_ids", "max_depth"),
                   keep_unused=True)
def spec_prefill(graphdef, params, proposer, pparams, tokens, prompt_lens, max_new, seeds, *,
                 shapes: DecodeShapes, sampling: Sampling, eos_ids: tuple[int, ...], max_depth: int) -> SpecState:
    """Prefill the target (and sample each row's first token) and the proposer; ``max_depth``: the
    deepest tree the decode will verify (sizes the accepted-count histogram).

    ``keep_unused``: a proposer whose prefill ignores its params (Medusa) must still pass them in,
    so that the state comes out committed to a device exactly when :func:`spec_chunk`'s does
    (restored params are committed); otherwise the first chunk compiles a second program.
    """
    dec, hidden = prefill_with_hidden(graphdef, params, tokens, prompt_lens, max_new, seeds, shapes=shapes,
                                      sampling=sampling, eos_ids=eos_ids)
    return spec_state(proposer, pparams, dec, hidden, tokens, prompt_lens, max_depth)


def spec_state(proposer, pparams, dec: DecodeState, hidden: jax.Array, tokens: jax.Array, prompt_lens: jax.Array,
               max_depth: int) -> SpecState:
    """The speculative state of freshly prefilled rows: the target's ``dec``, the final-normed prompt
    states ``hidden: [B, P, d]`` of the padded prompts ``tokens: [B, P]``, and the proposer's prefill."""
    b, capacity = tokens.shape[0], dec.cache.capacity
    width = min(tokens.shape[1], capacity)  # the prompt bucket may be wider than the cache
    history = jnp.zeros((b, capacity), jnp.int32).at[:, :width].set(tokens[:, :width])
    history = history.at[jnp.arange(b), prompt_lens].set(dec.last, mode="drop")
    pstate = proposer.prefill(pparams, tokens, prompt_lens, capacity, hidden)
    return SpecState(dec=dec, history=history, proposer=pstate, row_forwards=jnp.zeros((b,), jnp.int32),
                     accepted_hist=jnp.zeros((b, max_depth + 1), jnp.int32))


class StepTimes(NamedTuple):
    proposer_s: float  # wall time of the proposer halves, summed over steps
    target_s: float  # wall time of the target forward + verify + commit halves


propose_jit = jax.jit(propose_part, static_argnames=("graphdef", "proposer", "sampling", "rule"))
verify_jit = jax.jit(verify_part, static_argnames=_STATIC)


def timed_steps(graphdef, params, proposer, pparams, st: SpecState, steps: int, *, sampling: Sampling, rule: str,
                eos_ids: tuple[int, ...], end_on_finish: bool = False) -> tuple[SpecState, StepTimes]:
    """Run up to ``steps`` steps from the host, timing the proposer and the target halves apart.

    Slower than :func:`spec_chunk` (a host round trip per step); for measuring proposer cost.
    """
    prop_s = target_s = 0.0
    at_start = int(st.dec.done.sum())
    for _ in range(steps):
        if bool(jnp.all(st.dec.done)) or (end_on_finish and int(st.dec.done.sum()) > at_start):
            break
        t0 = time.perf_counter()
        pstate, prop = jax.block_until_ready(propose_jit(graphdef, params, proposer, pparams, st, sampling=sampling,
                                                          rule=rule))
        t1 = time.perf_counter()
        st = jax.block_until_ready(verify_jit(graphdef, params, proposer, pparams, st, pstate, prop,
                                               sampling=sampling, rule=rule, eos_ids=eos_ids))
        prop_s += t1 - t0
        target_s += time.perf_counter() - t1
    return st, StepTimes(prop_s, target_s)


def speculative_decode(graphdef, params, proposer, pparams, prompts: Sequence[Sequence[int]], *,
                       max_new: Sequence[int], seeds: Sequence[int], config: StepConfig, rule: str,
                       times: list[StepTimes] | None = None) -> Iterator[SpecState]:
    """Decode ``prompts`` speculatively, yielding the state after prefill and after each chunk.

    Like :func:`specdec.autoregressive.decode`, the caller may ``send`` back a state with
    more rows marked done. ``proposer``: a :class:`Proposer` or a :class:`ByLoad` schedule (picked
    at each chunk's start). ``shapes.capacity`` must leave room for a whole tree past the budget.
    ``times``: when a list, steps run from the host via :func:`timed_steps` and each chunk's
    :class:`StepTimes` is appended to it (profiling; slower).
    """
    if rule not in RULES:
        raise ValueError(f"unknown verification rule {rule!r}; known: {', '.join(RULES)}")
    c, load = config, by_load(proposer)
    st = spec_prefill(graphdef, params, load.steps[0][1], pparams, *prompt_arrays(prompts, c.shapes, max_new, seeds),
                      shapes=c.shapes, sampling=c.sampling, eos_ids=c.eos_ids, max_depth=load.max_depth)
    steps = c.chunk_steps or c.shapes.out
    static = dict(sampling=c.sampling, rule=rule, eos_ids=c.eos_ids, end_on_finish=c.end_on_finish)

    def chunk(st: SpecState) -> SpecState:
        chosen = load.pick(int((~st.dec.done).sum())) if len(load.steps) > 1 else load.steps[0][1]
        if times is None:
            return spec_chunk(graphdef, params, chosen, pparams, st, jnp.int32(steps), **static)
        st, spent = timed_steps(graphdef, params, chosen, pparams, st, steps, **static)
        times.append(spent)
        return st

    return run_chunks(st, chunk, lambda st: bool(jnp.all(st.dec.done)))

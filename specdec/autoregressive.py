"""Autoregressive decoding on device: bucketed prefill, then a ``lax.while_loop`` in chunks.

Rows of one batch have their own prompt length, position, seed, token budget
and stop state at every step. The host reads the state between chunks (for
streaming and stop strings); inside a chunk nothing leaves the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from specdec.cache import KVCache, init_cache
from specdec.config import LlamaConfig
from specdec.model import ForwardOutput, Llama, Segment, forward, forward_together
from specdec.sampling import Sampling


@struct.dataclass
class DecodeState:
    cache: KVCache
    last: jax.Array  # [B] newest token, not yet in the cache
    out: jax.Array  # [B, N] generated tokens (an EOS token is recorded, then the row stops)
    n_out: jax.Array  # [B] tokens generated so far
    done: jax.Array  # [B] bool
    max_new: jax.Array  # [B] token budget per row
    seeds: jax.Array  # [B] uint32
    forwards: jax.Array  # [] int32 target forwards run (prefill excluded)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prompt_bucket(n: int) -> int:
    """Padded prompt length: the next power of two up to 64 (at least 16), then four buckets per
    doubling (80, 96, 112, 128, 160, 192, ...): padding costs at most a quarter more prefill
    compute, not up to twice as much, for at most four compiled prefills per doubling."""
    whole = max(16, 1 << (n - 1).bit_length())
    return whole if whole <= 64 else round_up(n, whole // 8)


@dataclass(frozen=True, kw_only=True)
class DecodeShapes:
    """The static shapes of one decode: batch, padded prompt, cache slots, output buffer."""

    batch: int
    prompt: int
    capacity: int
    out: int


def plan_shapes(cfg: LlamaConfig, prompt_lens: Sequence[int], max_new: Sequence[int],
                max_cache_len: int | None = None, extra: int = 0) -> DecodeShapes:
    """Choose bucketed static shapes, or raise a clear error when a row cannot fit.

    ``extra``: slots needed past the last generated token (a speculative step writes a whole
    candidate tree of that many nodes). Cache slots are rounded up to a multiple of 64 only:
    attention reads the cache in windows of 128, 256, ... slots and then all of them, so unused
    slots past the last window cost decode time.
    """
    limit = cfg.max_seq_len if max_cache_len is None else max_cache_len
    for i, (p, n) in enumerate(zip(prompt_lens, max_new)):
        if p < 1:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if n < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {n} for prompt {i}")
        if p + n + extra > limit:
            what = "the cache (max_cache_len)" if max_cache_len is not None else "the model's context"
            tree = f" plus {extra} for the candidate tree" if extra else ""
            raise ValueError(
                f"prompt {i} has {p} tokens; with max_new_tokens={n}{tree} it needs {p + n + extra} positions, "
                f"more than the {limit} of {what}: shorten the prompt or lower max_new_tokens")
    need = max(p + n for p, n in zip(prompt_lens, max_new)) + extra
    return DecodeShapes(batch=len(prompt_lens), prompt=prompt_bucket(max(prompt_lens)),
                        capacity=min(round_up(need, 64), limit), out=round_up(max(max_new), 64))


def _record(st: DecodeState, active: jax.Array, token: jax.Array, eos_ids: tuple[int, ...]) -> DecodeState:
    rows = jnp.arange(token.shape[0])
    at = jnp.where(active, st.n_out, st.out.shape[1])  # inactive rows write out of range: dropped
    out = st.out.at[rows, at].set(token, mode="drop")
    n_out = st.n_out + active
    stop = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)) | (n_out >= st.max_new)
    return st.replace(out=out, n_out=n_out, done=st.done | (active & stop),
                      last=jnp.where(active, token, st.last))


def prompt_segment(cfg: LlamaConfig, tokens: jax.Array, prompt_lens: jax.Array, capacity: int) -> Segment:
    """The prefill forward of the padded prompts ``tokens: [B, P]`` (lengths ``prompt_lens: [B]``) into
    a fresh cache of ``capacity``: logits at each row's last prompt token, the last layer's states."""
    b, p = tokens.shape
    return Segment(cache=init_cache(cfg, b, capacity), tokens=tokens, positions=jnp.broadcast_to(jnp.arange(p), (b, p)),
                   logits_at=(prompt_lens - 1)[:, None], hidden_layers=(cfg.n_layers - 1,))


def prefilled(model: Llama, res: ForwardOutput, prompt_lens, max_new, seeds, *, out: int, sampling: Sampling,
              eos_ids: tuple[int, ...]) -> tuple[DecodeState, jax.Array]:
    """The decode state after the prompts' forward ``res`` (of :func:`prompt_segment`), each row's first
    token sampled, and the final-normed hidden states ``[B, P, d]`` at every prompt position."""
    b = prompt_lens.shape[0]
    first = sampling.sample(res.logits[:, 0], seeds, prompt_lens)
    st = DecodeState(cache=res.cache.with_lengths(prompt_lens), last=first, out=jnp.zeros((b, out), jnp.int32),
                     n_out=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), max_new=max_new, seeds=seeds,
                     forwards=jnp.int32(0))
    return _record(st, jnp.ones((b,), bool), first, eos_ids), model.norm(res.hiddens[model.config.n_layers - 1])


def prefill_with_hidden(graphdef, params, tokens, prompt_lens, max_new, seeds, *, shapes: DecodeShapes,
                        sampling: Sampling, eos_ids: tuple[int, ...]) -> tuple[DecodeState, jax.Array]:
    """Run the padded prompts ``tokens: [B, P]`` and sample each row's first token.

    Returns the state and the final-normed hidden states ``[B, P, d]`` at every prompt position (a
    caller that ignores them costs nothing: they are dropped when compiled).
    """
    model = nnx.merge(graphdef, params)
    (res,) = forward_together(model, [prompt_segment(model.config, tokens, prompt_lens, shapes.capacity)])
    return prefilled(model, res, prompt_lens, max_new, seeds, out=shapes.out, sampling=sampling, eos_ids=eos_ids)


@functools.partial(jax.jit, static_argnames=("graphdef", "shapes", "sampling", "eos_ids"))
def prefill(graphdef, params, tokens, prompt_lens, max_new, seeds, *, shapes: DecodeShapes,
            sampling: Sampling, eos_ids: tuple[int, ...]) -> DecodeState:
    """Run the padded prompts ``tokens: [B, P]`` and sample each row's first token."""
    return prefill_with_hidden(graphdef, params, tokens, prompt_lens, max_new, seeds, shapes=shapes,
                               sampling=sampling, eos_ids=eos_ids)[0]


def step_segment(st: DecodeState, width: int = 1) -> Segment:
    """One autoregressive step's forward: each row's newest token, then ``width - 1`` padding tokens
    the causal mask hides from it (see :func:`decode_chunk`)."""
    b = st.last.shape[0]
    return Segment(cache=st.cache, tokens=jnp.zeros((b, width), jnp.int32).at[:, 0].set(st.last),
                   positions=st.cache.lengths[:, None] + jnp.arange(width))


def stepped(st: DecodeState, res: ForwardOutput, sampling: Sampling, eos_ids: tuple[int, ...]) -> DecodeState:
    """The state after the step forward ``res`` (of :func:`step_segment`): each running row's next token."""
    active = ~st.done
    cache = res.cache.advance(active)
    token = sampling.sample(res.logits[:, 0], st.seeds, cache.lengths)
    return _record(st.replace(cache=cache, forwards=st.forwards + 1), active, token, eos_ids)


def chunk_loop(body: Callable, st, steps, done: Callable, end_on_finish: bool):
    """``lax.while_loop`` of ``body`` over ``st`` for up to ``steps`` steps while a row runs
    (``done(st): [B]`` bool); ``end_on_finish``: also end after the first step in which a row
    finishes (a request pool refills its slot at once instead of idling to the chunk's end)."""
    at_start = jnp.sum(done(st))

    def cond(carry):
        i, st = carry
        go = (i < steps) & ~jnp.all(done(st))
        return go & (jnp.sum(done(st)) == at_start) if end_on_finish else go

    return jax.lax.while_loop(cond, lambda carry: (carry[0] + 1, body(carry[1])), (jnp.int32(0), st))[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "width", "end_on_finish"),
                   donate_argnames=("st",))
def decode_chunk(graphdef, params, st: DecodeState, steps, layer_masks: jax.Array | None = None, *,
                 sampling: Sampling, eos_ids: tuple[int, ...], width: int = 1,
                 end_on_finish: bool = False) -> DecodeState:
    """Up to ``steps`` one-token steps for every unfinished row, on device (``end_on_finish``:
    see :func:`chunk_loop`).

    ``width > 1`` runs each step as a forward over ``width`` tokens (the newest, then
    padding the causal mask hides from it): the strict reference for a speculative
    method whose verification forward has that width (same shapes, same arithmetic).
    ``layer_masks: [S, n_layers]`` bool (SkipDecode): decode step ``i`` (``st.forwards``, shared
    by the batch) runs only the layers of row ``min(i, S - 1)``.
    """
    model = nnx.merge(graphdef, params)

    def body(st):
        seg = step_segment(st, width)
        mask = None if layer_masks is None else layer_masks[jnp.minimum(st.forwards, layer_masks.shape[0] - 1)]
        return stepped(st, forward(model, seg.cache, tokens=seg.tokens, positions=seg.positions, layer_mask=mask),
                       sampling, eos_ids)

    return chunk_loop(body, st, steps, lambda st: st.done, end_on_finish)


def pad_prompts(prompts: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """[B, width] int32, each prompt left-aligned, zero padded."""
    out = np.zeros((len(prompts), width), np.int32)
    for i, ids in enumerate(prompts):
        out[i, :len(ids)] = ids
    return out


def prompt_arrays(prompts: Sequence[Sequence[int]], shapes: DecodeShapes, max_new: Sequence[int],
                  seeds: Sequence[int]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Device arrays of a batch: padded tokens [B, P], prompt lengths [B], budgets [B], seeds [B]."""
    return (jnp.asarray(pad_prompts(prompts, shapes.prompt)), jnp.asarray([len(p) for p in prompts], jnp.int32),
            jnp.asarray(max_new, jnp.int32), jnp.asarray(seeds, jnp.uint32))


def run_chunks(state, chunk: Callable, finished: Callable) -> Iterator:
    """Yield ``state``, then ``chunk(state)`` until ``finished(state)``.

    The caller may ``send`` back a replacement state (e.g. with more rows marked done).
    """
    while True:
        replaced = yield state
        if replaced is not None:
            state = replaced
        if finished(state):
            return
        state = chunk(state)


@dataclass(frozen=True, kw_only=True)
class StepConfig:
    """What every decode step of a run shares, autoregressive or speculative: the sampling, the EOS
    ids, the shapes, the on-device steps between host visits (``chunk_steps``; None: all at once)
    and whether a chunk ends once a row finishes (``end_on_finish``, see :func:`chunk_loop`)."""

    sampling: Sampling
    eos_ids: tuple[int, ...]
    shapes: DecodeShapes
    chunk_steps: int | None = None
    end_on_finish: bool = False


def decode(graphdef, params, prompts: Sequence[Sequence[int]], *, max_new: Sequence[int], seeds: Sequence[int],
           config: StepConfig, width: int = 1, layer_masks: np.ndarray | None = None) -> Iterator[DecodeState]:
    """Decode ``prompts`` (token id lists; ``max_new`` tokens and a seed each), yielding the state
    after prefill and after each chunk.

    The caller may mark rows done between chunks (``state.replace(done=...)``) via ``send``.
    ``width``: tokens per step's forward; ``layer_masks``: layers per step.
    """
    c = config
    st = prefill(graphdef, params, *prompt_arrays(prompts, c.shapes, max_new, seeds), shapes=c.shapes,
                 sampling=c.sampling, eos_ids=c.eos_ids)
    steps = jnp.int32(c.chunk_steps or c.shapes.out)
    masks = None if layer_masks is None else jnp.asarray(layer_masks)
    return run_chunks(st, lambda st: decode_chunk(graphdef, params, st, steps, masks, sampling=c.sampling,
                                                  eos_ids=c.eos_ids, width=width, end_on_finish=c.end_on_finish),
                      lambda st: bool(jnp.all(st.done)))

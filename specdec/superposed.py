"""Superposed decoding (Shen et al. 2024): k drafts per prompt for the cost of one autoregressive pass.

Per prompt, one KV cache row (the cache batch is the number of prompts, whatever k is):

1. The prompt's next-token distribution gives the first step: the k drafts are its top-k
   candidates (with n-gram interpolation, the top-k by interpolated score).
2. Every later step runs ONE forward per prompt whose input is the superposition
   ``sum_i w_i * embed(last token of draft i)``, ``w = softmax(draft scores)`` (the drafts'
   normalised probabilities). Its next-token distribution, tempered by ``temperature`` and
   truncated to the top ``n_token_sample`` tokens (renormalised), is shared by all drafts.
3. Each draft scores each candidate with ``(1 - alpha) log p_LM + alpha log p_ngram``, the n-gram
   model read on the draft's own last tokens (prompt included); a candidate with no n-gram support
   scores ``(1 - alpha) log p_LM - penalty`` instead (per candidate, see ``candidate_logp``).
   A draft's score is the sum of its steps' scores. The best k of the k x n_token_sample
   extensions that do not end in an EOS id stay alive (distinct: distinct parents or tokens);
   extensions ending in EOS compete for the k places of the finished set.
4. Optional reset every ``s`` steps: keep only the best alive draft, rewrite the KV entries of its
   last ``s`` tokens with its real token embeddings (one width-s forward replacing the superposed
   entries), and branch again into the top-k of that forward's distribution as in step 1. The
   reference code (RAIVNLab/SuperposedDecoding) has no reset; this is our reading of the paper's
   remedy for long generations. ``reset_every=0`` (default) never resets.

Scores include the EOS step for finished drafts; their token lists end with the EOS id.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from specdec.autoregressive import plan_shapes, prompt_arrays
from specdec.cache import KVCache, init_cache
from specdec.method_spec import MethodSpec, option, register
from specdec.model import forward
from specdec.ngrams import NgramModel, default_lambdas, ngram_probs

NEG_INF = -jnp.inf
PUBLISHED = dict(alpha=0.54, temperature=0.06, penalty=200.0)


@struct.dataclass
class SuperposedState:
    cache: KVCache  # batch = prompts
    logp: jax.Array  # [B, C] shared next-token log-probs (tempered, truncated to C = n_token_sample)
    ids: jax.Array  # [B, C] their token ids, most likely first
    alive: jax.Array  # [B, k, N] alive drafts' tokens (the first t are set after t steps)
    alive_score: jax.Array  # [B, k] summed step scores; -inf marks an empty slot
    context: jax.Array  # [B, k, W] last W tokens of prompt + draft, right-aligned (n-gram context)
    context_len: jax.Array  # [B, k] how many of those W are real
    fin: jax.Array  # [B, k, N] finished drafts' tokens (ending with an EOS id)
    fin_score: jax.Array  # [B, k] -inf marks an empty slot
    fin_len: jax.Array  # [B, k]


def truncate(logits: jax.Array, temperature, n: int) -> tuple[jax.Array, jax.Array]:
    """Top-``n`` tokens of ``logits: [B, V]`` and their log-probs renormalised at ``temperature``: [B, n] each."""
    top, ids = jax.lax.top_k(logits.astype(jnp.float32), n)
    return jax.nn.log_softmax(top / temperature, axis=-1), ids


def superpose(table: jax.Array, tokens: jax.Array, scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Superposed input embedding of drafts ending in ``tokens: [B, k]`` with scores ``[B, k]``.

    Returns ``embeds: [B, d]`` (``table: [V, d]`` rows weighted by the drafts' normalised
    probabilities) and the weights ``[B, k]`` (summing to 1; empty -inf slots weigh 0).
    """
    weights = jax.nn.softmax(jnp.where(jnp.isfinite(scores), scores, -1e30), axis=-1)
    embeds = jnp.einsum("bk,bkd->bd", weights, table[tokens].astype(jnp.float32))
    return embeds.astype(table.dtype), weights


def candidate_logp(logp: jax.Array, ids: jax.Array, context: jax.Array, context_len: jax.Array,
                   ngrams: NgramModel | None, alpha, lambdas, penalty) -> jax.Array:
    """Step scores ``[B, k, C]`` of each draft's candidates ``ids: [B, C]`` with LM log-probs ``logp: [B, C]``.

    ``(1 - alpha) * logp + alpha * log p_ngram`` when the n-gram model supports the candidate
    after the draft's ``context: [B, k, W]`` (``context_len: [B, k]`` real tokens), else
    ``(1 - alpha) * logp - penalty``. Without n-grams: ``logp``, the same for every draft.
    """
    k = context.shape[1]
    lm = jnp.broadcast_to(logp[:, None, :], (logp.shape[0], k, logp.shape[1]))
    if ngrams is None:
        return lm
    p, supported = ngram_probs(ngrams, context, context_len, jnp.broadcast_to(ids[:, None, :], lm.shape), lambdas)
    mixed = (1 - alpha) * lm + alpha * jnp.log(jnp.where(supported, p, 1.0))
    return jnp.where(supported, mixed, (1 - alpha) * lm - penalty)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Rows ``idx: [B, k]`` of ``x: [B, k_in, ...]`` -> ``[B, k, ...]``."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _select(st: SuperposedState, step_lp: jax.Array, t, eos_ids: tuple[int, ...]) -> SuperposedState:
    """Grow the alive and finished drafts by one token (step ``t``) from step scores ``[B, k, C]``."""
    b, k, c = step_lp.shape
    cand = (st.alive_score[..., None] + step_lp).reshape(b, k * c)
    eos = jnp.tile(jnp.isin(st.ids, jnp.asarray(eos_ids, jnp.int32)), (1, k))  # [B, k*C]
    score, pick = jax.lax.top_k(jnp.where(eos, NEG_INF, cand), k)
    parent, tok = pick // c, jnp.take_along_axis(st.ids, pick % c, axis=1)
    context = jnp.concatenate([_take(st.context, parent)[..., 1:], tok[..., None]], axis=-1)
    # finished: the old k plus every extension ending in EOS, best k kept
    fin_score, fpick = jax.lax.top_k(jnp.concatenate([st.fin_score, jnp.where(eos, cand, NEG_INF)], axis=1), k)
    old, new = jnp.minimum(fpick, k - 1), jnp.maximum(fpick - k, 0)
    ended = _take(st.alive, new // c).at[:, :, t].set(jnp.take_along_axis(st.ids, new % c, axis=1))
    is_old = fpick < k
    return st.replace(
        alive=_take(st.alive, parent).at[:, :, t].set(tok), alive_score=score, context=context,
        context_len=jnp.minimum(_take(st.context_len, parent) + 1, context.shape[-1]),
        fin=jnp.where(is_old[..., None], _take(st.fin, old), ended), fin_score=fin_score,
        fin_len=jnp.where(is_old, _take(st.fin_len, old), t + 1))


def _superposed_forward(model, st: SuperposedState, t, temperature) -> SuperposedState:
    """One width-1 forward per prompt on the superposed embedding of the drafts' token ``t``."""
    embeds, _ = superpose(model.embed.embedding[...], st.alive[:, :, t], st.alive_score)
    res = forward(model, st.cache, embeds=model.embed_input(embeds[:, None]), positions=st.cache.lengths[:, None])
    logp, ids = truncate(res.logits[:, 0], temperature, st.ids.shape[1])
    return st.replace(cache=res.cache.advance(jnp.ones_like(st.cache.lengths)), logp=logp, ids=ids)


def _reset_forward(model, st: SuperposedState, t, temperature, every: int) -> SuperposedState:
    """Keep the best alive draft, rewrite the KV of its tokens ``t-every+1 .. t``, branch again."""
    k = st.alive.shape[1]
    best = jnp.argmax(st.alive_score, axis=1)[:, None]  # [B, 1]
    keep = jnp.broadcast_to(best, best.shape[:1] + (k,))
    window = jax.lax.dynamic_slice_in_dim(_take(st.alive, best)[:, 0], t + 1 - every, every, axis=1)
    start = st.cache.lengths - (every - 1)
    res = forward(model, st.cache.with_lengths(start), tokens=window, positions=start[:, None] + jnp.arange(every),
                  logits_at=jnp.full((window.shape[0], 1), every - 1))
    logp, ids = truncate(res.logits[:, 0], temperature, st.ids.shape[1])
    score = jnp.where(jnp.arange(k) == 0, _take(st.alive_score, best), NEG_INF)
    return st.replace(cache=res.cache.with_lengths(start + every), logp=logp, ids=ids, alive=_take(st.alive, keep),
                      alive_score=score, context=_take(st.context, keep), context_len=_take(st.context_len, keep))


@struct.dataclass
class Scoring:
    """How a draft's candidates are scored: the LM's log-probs interpolated with ``ngrams`` (None:
    the LM alone) by ``alpha``, ``lambdas`` ``[len(ngrams.ns)]`` per n, ``penalty`` where the n-grams
    do not support a candidate (see :func:`candidate_logp`)."""

    ngrams: NgramModel | None
    alpha: jax.Array
    lambdas: jax.Array
    penalty: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "num_drafts", "n_token_sample", "steps",
                                             "reset_every", "eos_ids"))
def superposed_core(graphdef, params, tokens, prompt_lens, scoring: Scoring, temperature, *, capacity: int,
                    num_drafts: int, n_token_sample: int, steps: int, reset_every: int,
                    eos_ids: tuple[int, ...]) -> SuperposedState:
    """Prefill ``tokens: [B, P]`` (rows left-aligned, ``prompt_lens: [B]``) and run ``steps`` superposed steps.

    ``steps - 1`` forwards of width 1 (or ``reset_every`` at a reset) follow the prefill; the
    returned state holds ``[B, k, steps]`` alive drafts and up to k finished drafts per prompt.
    """
    model = nnx.merge(graphdef, params)
    b, p = tokens.shape
    k, n = num_drafts, steps
    width = scoring.ngrams.context_width if scoring.ngrams is not None else 1
    res = forward(model, init_cache(model.config, b, capacity), tokens=tokens,
                  positions=jnp.broadcast_to(jnp.arange(p), (b, p)), logits_at=(prompt_lens - 1)[:, None])
    logp, ids = truncate(res.logits[:, 0], temperature, n_token_sample)
    at = prompt_lens[:, None] - width + jnp.arange(width)  # [B, W] prompt positions of the context
    context = jnp.where(at >= 0, jnp.take_along_axis(tokens, jnp.maximum(at, 0), axis=1), 0)
    st = SuperposedState(
        cache=res.cache.with_lengths(prompt_lens), logp=logp, ids=ids, alive=jnp.zeros((b, k, n), jnp.int32),
        alive_score=jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF), (b, k)),
        context=jnp.broadcast_to(context[:, None], (b, k, width)),
        context_len=jnp.broadcast_to(jnp.minimum(prompt_lens, width)[:, None], (b, k)),
        fin=jnp.zeros((b, k, n), jnp.int32), fin_score=jnp.full((b, k), NEG_INF), fin_len=jnp.zeros((b, k), jnp.int32))

    def select(st, t):
        lp = candidate_logp(st.logp, st.ids, st.context, st.context_len, scoring.ngrams, scoring.alpha, scoring.lambdas,
                            scoring.penalty)
        return _select(st, lp, t, eos_ids)

    def body(st, t):
        st = select(st, t)
        if not reset_every:
            return _superposed_forward(model, st, t, temperature), None
        return jax.lax.cond((t + 1) % reset_every == 0, lambda s: _reset_forward(model, s, t, temperature, reset_every),
                            lambda s: _superposed_forward(model, s, t, temperature), st), None

    st = jax.lax.scan(body, st, jnp.arange(n - 1))[0]
    return select(st, n - 1)


def superposed_decode(graphdef, params, prompts: Sequence[Sequence[int]], spec: Superposed | None = None, *,
                      max_new_tokens: int = 10, eos_ids: Sequence[int] = (),
                      max_cache_len: int | None = None) -> list[list[tuple[list[int], float]]]:
    """Superposed decoding of token-id ``prompts``: per prompt, up to ``spec.num_drafts`` drafts, best first.

    Args:
      graphdef, params: the split model (``nnx.split``).
      spec: the method's options (default ``Superposed()``): num_drafts k; ngrams, the n-gram tables
        (an :class:`specdec.ngrams.NgramModel` here; None scores with the LM alone, alpha must be 0);
        alpha, the n-gram weight (default 0.54 with n-grams, 0 without; 0 ignores ngrams); tau, the
        shared distribution's temperature (published 0.06; > 0); n_token_sample, tokens kept from
        it (default 3k); ngram_weights, the lambdas, one > 0 per n in ``ngrams.ns`` (default the
        published 0.01, 0.04, 0.15, 0.18, 0.12); reset_every, the reset period in steps (None or 0:
        never; see the module docstring).
      max_new_tokens: steps; alive drafts have exactly this many tokens, finished ones fewer (ending in EOS).
      eos_ids: tokens that end a draft.
    Returns:
      per prompt, a list of ``(tokens, score)``, distinct, sorted by score (best first): the best
      k of the alive and finished drafts, ``score`` the sum of the per-step interpolated log-probs.
    """
    spec = spec or Superposed()
    ngrams, alpha, lambdas, reset_every = spec.ngrams, spec.alpha, spec.ngram_weights, spec.reset_every or 0
    temperature = PUBLISHED["temperature"] if spec.tau is None else spec.tau
    cfg = nnx.merge(graphdef, params).config
    k = spec.num_drafts
    n_token_sample = 3 * k if spec.n_token_sample is None else spec.n_token_sample
    if alpha is None:
        alpha = PUBLISHED["alpha"] if ngrams is not None else 0.0
    if not 1 <= k <= n_token_sample <= cfg.vocab_size:
        raise ValueError(f"need 1 <= num_drafts ({k}) <= n_token_sample ({n_token_sample}) <= vocab ({cfg.vocab_size})")
    if not temperature > 0:
        raise ValueError(f"tau (the temperature) must be > 0 for superposed decoding, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if ngrams is None and alpha != 0:
        raise ValueError(f"alpha={alpha} interpolates with an n-gram model: pass ngrams= or set alpha=0")
    if reset_every < 0:
        raise ValueError(f"reset_every must be >= 0 (0 = never), got {reset_every}")
    if alpha == 0:
        ngrams = None
    if ngrams is not None:
        if ngrams.info.get("vocab_size", cfg.vocab_size) != cfg.vocab_size:
            raise ValueError(f"the n-gram tables were built for a vocabulary of {ngrams.info['vocab_size']} tokens, "
                             f"the model has {cfg.vocab_size}")
        lambdas = default_lambdas(ngrams.ns) if lambdas is None else tuple(lambdas)
        if len(lambdas) != len(ngrams.ns) or min(lambdas) <= 0:
            raise ValueError(f"ngram_weights (lambdas) must be {len(ngrams.ns)} weights > 0 (for n = {ngrams.ns}), "
                             f"got {lambdas}")
    lens = [len(p) for p in prompts]
    shapes = plan_shapes(cfg, lens, [max_new_tokens] * len(prompts), max_cache_len)
    tokens, prompt_lens, _, _ = prompt_arrays(prompts, shapes, [max_new_tokens] * len(prompts), [0] * len(prompts))
    scoring = Scoring(ngrams=ngrams, alpha=jnp.float32(alpha), lambdas=jnp.asarray(lambdas or (), jnp.float32),
                      penalty=jnp.float32(PUBLISHED["penalty"]))
    st = superposed_core(graphdef, params, tokens, prompt_lens, scoring, jnp.float32(temperature),
                         capacity=shapes.capacity, num_drafts=k, n_token_sample=n_token_sample, steps=max_new_tokens,
                         reset_every=reset_every, eos_ids=tuple(sorted(set(map(int, eos_ids)))))
    return collect(st)


def collect(st: SuperposedState) -> list[list[tuple[list[int], float]]]:
    """Per prompt, the best k of the alive and finished drafts of a final state, best first (host lists)."""
    alive, alive_score, fin, fin_score, fin_len = jax.device_get(
        (st.alive, st.alive_score, st.fin, st.fin_score, st.fin_len))
    out = []
    for b in range(alive.shape[0]):
        drafts = [(alive[b, i].tolist(), float(alive_score[b, i])) for i in range(alive.shape[1])]
        drafts += [(fin[b, i, :fin_len[b, i]].tolist(), float(fin_score[b, i])) for i in range(fin.shape[1])]
        drafts = sorted((d for d in drafts if d[1] > -float("inf")), key=lambda d: -d[1])
        out.append(drafts[:alive.shape[1]])
    return out


@register
@dataclass(frozen=True, kw_only=True)
class Superposed(MethodSpec):
    """Superposed decoding (LOSSY): k drafts per prompt from one batch-1 forward per step."""

    name: ClassVar[str] = "superposed"
    lossless: ClassVar[bool] = False
    summary: ClassVar[str] = "k drafts per prompt from one superposed forward per step, ranked with n-grams (LOSSY)"
    num_drafts: int = option(3, "drafts per prompt")
    ngrams: Any = option(None, "n-gram file from `specdec build-ngrams` (default: the model's, built on first use)",
                         cli=str)
    alpha: float | None = option(None, f"n-gram weight (default {PUBLISHED['alpha']} with n-grams; 0 = LM only)",
                                 cli=float)
    tau: float | None = option(None, f"temperature of the shared distribution (default {PUBLISHED['temperature']})",
                               cli=float)
    n_token_sample: int | None = option(None, "candidates per step (default 3 x num_drafts)")
    ngram_weights: Sequence[float] | None = option(None, "one weight per n-gram order (default: the published ones)",
                                                   cli=None)
    reset_every: int | None = option(None, "reset period in steps (default: never)")

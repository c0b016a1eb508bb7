"""Llama-family decoder in Flax NNX and its one forward over a ragged KV cache.

One definition serves Llama 2/3.x, Mistral, Qwen2/3 and Gemma 2/3 through the switches of
:class:`~specdec.config.LlamaConfig`. The parameters live in NNX modules; decoding code splits
the model once (``nnx.split``) and calls :func:`forward` inside jitted pure functions, with the
KV cache passed in and returned as an explicit pytree.

Every product runs at the config's ``precision``: "highest" (the CPU default) keeps float32
products in full float32 on every backend, which the equivalence checker's float32 tie tolerance
is sized for; JAX would otherwise let NVIDIA GPUs use TF32 and TPUs bfloat16 passes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdec.cache import KVCache, causal_mask, init_cache, key_positions, visibility, write_layer
from specdec import few_rows
from specdec.config import LlamaConfig
from specdec.rope import apply_rotary, rotary


class RMSNorm(nnx.Module):
    """RMS norm in float32, scaled by ``w`` (or ``1 + w`` with ``plus_one``, Gemma's convention)."""

    def __init__(self, dim: int, eps: float, dtype, plus_one: bool = False):
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if plus_one else jnp.ones((dim,), dtype))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (self.weight[...].astype(jnp.float32) + float(self.plus_one))).astype(x.dtype)


def _norm(cfg: LlamaConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or cfg.d_model, cfg.rms_eps, cfg.jnp_dtype, cfg.norm_plus_one)


def _linear(din: int, dout: int, cfg: LlamaConfig, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype,
                      precision=cfg.matmul_precision, dot_general=few_rows.dot_general, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.q = _linear(cfg.d_model, cfg.n_heads * cfg.head_dim, cfg, rngs, cfg.qkv_bias)
        self.k = _linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg, rngs, cfg.qkv_bias)
        self.v = _linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg, rngs, cfg.qkv_bias)
        self.o = _linear(cfg.n_heads * cfg.head_dim, cfg.d_model, cfg, rngs)
        # Qwen3, Gemma 3: an RMS norm over each query and key head, before RoPE
        self.q_norm = _norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = _norm(cfg, cfg.head_dim) if cfg.qk_norm else None


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
    """Gated MLP: SwiGLU (``silu``) or GeGLU (``gelu_tanh``, Gemma)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.gate = _linear(cfg.d_model, cfg.ffn_dim, cfg, rngs)
        self.up = _linear(cfg.d_model, cfg.ffn_dim, cfg, rngs)
        self.down = _linear(cfg.ffn_dim, cfg.d_model, cfg, rngs)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(_ACTIVATIONS[self.activation](self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm attention and MLP; with ``post_norms`` (Gemma 2/3) each output is normed too."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg, rngs)
        self.post_attn_norm = _norm(cfg) if cfg.post_norms else None
        self.post_mlp_norm = _norm(cfg) if cfg.post_norms else None


class Llama(nnx.Module):
    """Token embedding, ``n_layers`` pre-norm blocks, final norm, tied or untied LM head."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype,
                               param_dtype=cfg.jnp_dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.norm = _norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else _linear(cfg.d_model, cfg.vocab_size, cfg, rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed ``hidden: [..., d_model]`` -> float32 logits ``[..., vocab]``."""
        if self.lm_head is None:
            # contract against the [vocab, d] table as stored: a transposed copy per step would
            # read and write the whole table again
            out = few_rows.dot_general(hidden, self.embed.embedding[...], (((hidden.ndim - 1,), (1,)), ((), ())),
                                       precision=self.config.matmul_precision, preferred_element_type=jnp.float32)
        else:
            out = self.lm_head(hidden)
        return softcap(out.astype(jnp.float32), self.config.final_softcap)

    def embed_input(self, x: jax.Array) -> jax.Array:
        """Rows of the embedding table (``[..., d_model]``, looked up or mixed) -> the first block's
        input: times sqrt(d_model) (rounded to the dtype, as Gemma does) where ``embed_scale``."""
        if not self.config.embed_scale:
            return x
        return x * jnp.asarray(self.config.d_model ** 0.5, x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [B, K, vocab] float32 (K = T, or the logits_at count)
    hidden: jax.Array  # [B, K, d_model] final-normed hidden state (what the LM head reads)
    hiddens: dict  # layer index -> [B, T, d_model] residual stream after that layer
    cache: KVCache


WINDOW_SLOTS = 128  # the smallest attention window; larger ones double it up to the whole cache


def attention_windows(capacity: int, t: int) -> list[int]:
    """Window sizes (leading cache slots) a forward of ``t`` new tokens may attend over, smallest
    first: 128, 256, ... below ``capacity``, then ``capacity``. Windows narrower than ``t`` are left out
    (the new tokens alone fill them)."""
    doubled = (WINDOW_SLOTS << i for i in range(max(capacity, 1).bit_length()))
    return [w for w in doubled if t <= w < capacity] + [capacity]


def _attend_dense(cfg: LlamaConfig, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, KVH, S, D]; visible: [B, T, S] -> [B, T, H*D].

    Each (row, KV head) is one matrix product of its T x G queries with its slots (G query heads
    share a KV head), which XLA on CPU runs faster than products batched over T and G too.
    """
    b, t = q.shape[:2]
    kvh, groups, d = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    q = q.reshape(b, t, kvh, groups, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * groups, d)
    scores = jnp.einsum("bkmd,bksd->bkms", q, k, precision=cfg.matmul_precision, preferred_element_type=jnp.float32)
    scores = softcap(scores * (cfg.query_scale or d) ** -0.5, cfg.attn_softcap)
    seen = jnp.repeat(visible, groups, axis=1)[:, None]  # [B, 1, T * G, S]
    probs = jax.nn.softmax(jnp.where(seen, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v, precision=cfg.matmul_precision, preferred_element_type=jnp.float32)
    return out.reshape(b, kvh, t, groups, d).transpose(0, 2, 1, 3, 4).reshape(b, t, cfg.n_heads * d).astype(q.dtype)


def attend(cfg: LlamaConfig, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
            lengths: jax.Array) -> jax.Array:
    """Attention of ``q: [B, T, H, D]`` over the leading window of the cache that the longest row
    needs (``lengths: [B]`` + T slots, see :func:`attention_windows`), not every slot: a slot past
    that is visible to no token. -> [B, T, H*D]."""
    windows = attention_windows(k.shape[2], q.shape[1])
    if len(windows) == 1:
        return _attend_dense(cfg, q, k, v, visible)
    need = jnp.max(lengths) + q.shape[1]
    pick = jnp.sum(need > jnp.asarray(windows[:-1]))
    branches = [lambda q, k, v, seen, w=w: _attend_dense(cfg, q, k[:, :, :w], v[:, :, :w], seen[..., :w])
                for w in windows]
    return jax.lax.switch(pick, branches, q, k, v, visible)


def _unpack(x: jax.Array, packed: jax.Array | None, b: int, t: int) -> jax.Array:
    """Flat tokens ``x: [K, ...]`` -> ``[B, T, ...]``: at the flat indices ``packed: [K]`` with zeros
    elsewhere, or (``packed`` None, K = B * T) every token in order."""
    if packed is None:
        return x.reshape((b, t) + x.shape[1:])
    return jnp.zeros((b * t,) + x.shape[1:], x.dtype).at[packed].set(x).reshape((b, t) + x.shape[1:])


def _pack(x: jax.Array, packed: jax.Array | None) -> jax.Array:
    """``x: [B, T, ...]`` -> flat tokens ``[K, ...]``: those at the flat indices ``packed: [K]``, or all."""
    flat = x.reshape((-1,) + x.shape[2:])
    return flat if packed is None else flat[packed]


class Segment(NamedTuple):
    """One forward's tokens in :func:`forward_together` (see :func:`forward` for the fields)."""

    cache: KVCache
    tokens: jax.Array  # [B, T]
    positions: jax.Array  # [B, T]
    block_mask: jax.Array | None = None  # [B, T, T] or [T, T]; default causal
    packed: jax.Array | None = None  # [K] flat indices of the tokens computed
    logits_at: jax.Array | None = None  # [B, K] indices into T
    hidden_layers: tuple[int, ...] = ()


class _Rows(NamedTuple):
    """A segment's layout inside the blocks: positions [B, T], visibility [B, T, S] of full-attention
    and of sliding-window layers (None without such layers), packed [K] | None, and the RoPE
    ``(cos, sin)`` of its tokens per (base, scaling) the layers use."""

    positions: jax.Array
    visible: jax.Array
    visible_local: jax.Array | None
    packed: jax.Array | None
    rotary: dict


def _rows_of(cfg: LlamaConfig, seg: Segment) -> _Rows:
    """The segment's layout: which cache slots each of its tokens sees (its block mask, default causal;
    in sliding-window layers only keys less than the window back)."""
    b, t = seg.positions.shape
    block_mask = causal_mask(b, t) if seg.block_mask is None else seg.block_mask
    block_mask = jnp.broadcast_to(block_mask.astype(bool), (b, t, t))
    visible = visibility(seg.cache.lengths, block_mask, seg.cache.capacity)
    local = None
    if any(cfg.window(layer) is not None for layer in range(cfg.n_layers)):
        near = seg.positions[:, :, None] - key_positions(seg.cache.lengths, seg.positions, seg.cache.capacity)[:, None]
        local = visible & (near < cfg.sliding_window)
    ropes = {cfg.rope_of(layer) for layer in range(cfg.n_layers)}
    return _Rows(seg.positions, visible, local, seg.packed,
                 {r: rotary(seg.positions, cfg.head_dim, *r, cfg.max_seq_len) for r in ropes})


def _segment_ends(rows: Sequence[_Rows]) -> list[int]:
    """Where each segment's flat tokens end along K, but the last (``jnp.split`` points)."""
    return np.cumsum([r.positions.size if r.packed is None else r.packed.shape[0] for r in rows])[:-1].tolist()


def _self_attention(cfg: LlamaConfig, attn: Attention, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
                    rows: _Rows, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One segment's attention: flat projections ``q: [K, H*D]``, ``k, v: [K, KVH*D]`` -> ``[K, H*D]``;
    writes the segment's K/V into its cache."""
    b, t = rows.positions.shape
    q = _unpack(q, rows.packed, b, t).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = _unpack(k, rows.packed, b, t).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = _unpack(v, rows.packed, b, t).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = rows.rotary[cfg.rope_of(layer)]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    cache = write_layer(cache, layer, k, v)
    visible = rows.visible if cfg.window(layer) is None else rows.visible_local
    return _pack(attend(cfg, q, cache.k[layer], cache.v[layer], visible, cache.lengths), rows.packed), cache


def _block(cfg: LlamaConfig, block: Block, layer: int, x: jax.Array, rows: Sequence[_Rows],
           caches: Sequence[KVCache]) -> tuple[jax.Array, list[KVCache]]:
    """One block over the flat tokens ``x: [K, d]`` of one or more segments (``rows``, ``caches``; in
    order along K): every matrix product runs once over all of them, attention within each segment."""
    h = block.attn_norm(x)
    q, k, v = block.attn.q(h), block.attn.k(h), block.attn.v(h)
    ends = _segment_ends(rows)
    parts = [_self_attention(cfg, block.attn, layer, *proj, r, c)
             for *proj, r, c in zip(jnp.split(q, ends), jnp.split(k, ends), jnp.split(v, ends), rows, caches)]
    attended = block.attn.o(parts[0][0] if len(parts) == 1 else jnp.concatenate([a for a, _ in parts]))
    x = x + (attended if block.post_attn_norm is None else block.post_attn_norm(attended))
    mixed = block.mlp(block.mlp_norm(x))
    x = x + (mixed if block.post_mlp_norm is None else block.post_mlp_norm(mixed))
    return x, [c for _, c in parts]


def _masked_block(cfg: LlamaConfig, block: Block, layer: int, x: jax.Array, rows: _Rows, cache: KVCache,
                  layer_mask: jax.Array | None) -> tuple[jax.Array, KVCache]:
    """One block of a single segment, skipped or kept per ``layer_mask`` (see :func:`forward`)."""
    if layer_mask is None:
        x, (cache,) = _block(cfg, block, layer, x, [rows], [cache])
        return x, cache
    if layer_mask.ndim == 1:
        return jax.lax.cond(layer_mask[layer], lambda x, c: _masked_block(cfg, block, layer, x, rows, c, None),
                            lambda x, c: (x, c), x, cache)
    y, cache = _masked_block(cfg, block, layer, x, rows, cache, None)
    return jnp.where(_pack(layer_mask[:, :, layer], None)[:, None], y, x), cache


def _outputs(model: Llama, x: jax.Array, rows: _Rows, cache: KVCache, hiddens: dict, logits_at: jax.Array | None,
             compute_logits: bool) -> ForwardOutput:
    """A segment's final flat tokens ``x: [K, d]`` -> its :class:`ForwardOutput`."""
    b, t = rows.positions.shape
    if logits_at is not None:
        x = jnp.take_along_axis(_unpack(x, None, b, t), logits_at[:, :, None], axis=1)
    hidden = model.norm(x)
    logits = model.logits(hidden) if compute_logits else None
    if logits_at is None:
        hidden = _unpack(hidden, rows.packed, b, t)
        logits = None if logits is None else _unpack(logits, rows.packed, b, t)
    return ForwardOutput(logits=logits, hidden=hidden, hiddens=hiddens, cache=cache)


def forward(
    model: Llama,
    cache: KVCache,
    *,
    positions: jax.Array,
    tokens: jax.Array | None = None,
    embeds: jax.Array | None = None,
    block_mask: jax.Array | None = None,
    layers: Sequence[int] | None = None,
    layer_mask: jax.Array | None = None,
    hidden_layers: Sequence[int] = (),
    logits_at: jax.Array | None = None,
    compute_logits: bool = True,
    packed: jax.Array | None = None,
) -> ForwardOutput:
    """Run T new tokens per row through the model, writing their K/V at each row's length.

    Args:
      model: the (merged) model.
      cache: KV cache; ``cache.lengths`` is not advanced (see ``KVCache.advance``).
      positions: [B, T] RoPE position of each new token (``lengths + depth`` for tree nodes).
      tokens: [B, T] token ids, or
      embeds: [B, T, d_model] the first run layer's input instead of ids: ``model.embed_input`` of
        mixed embedding rows (superposed decoding), or the residual stream at an exit layer.
      block_mask: [B, T, T] or [T, T] bool, which new tokens each new token sees;
        default causal (a chain). Use an ancestor mask for a tree.
      layers: static layer indices to run, in order (default all). Stopping at an
        exit layer E is ``layers=range(E)``; the final norm and LM head still apply.
      layer_mask: optional dynamic choice among ``layers`` (SkipDecode). ``[n_layers]`` bool: one
        set for the whole batch, a layer that is off is not computed and its K/V neither written
        nor read (``lax.cond``); ``[B, T, n_layers]``: per token, every layer is computed and a
        token keeps a layer's output only where its mask is on (teacher forcing, training).
      hidden_layers: static layer indices whose output residual stream is returned.
      logits_at: optional [B, K] indices into T: compute logits only there.
      compute_logits: skip the LM head entirely when False.
      packed: optional [K] distinct flat indices into the B * T tokens (``row * T + t``): only these
        are computed (the matrix products run on K rows, not B * T); the others get zero K/V and
        zero logits, hidden and hiddens, and no computed token may see one (e.g. a tree's kept
        nodes with their ancestors). Budgeted speculation verifies this way.
    Returns:
      ForwardOutput(logits [B, K, V] | None, hidden [B, K, d], hiddens, cache).
    """
    if (tokens is None) == (embeds is None):
        raise ValueError("pass exactly one of tokens [B, T] or embeds [B, T, d_model]")
    b, t = (tokens if embeds is None else embeds).shape[:2]
    if packed is not None and (embeds is not None or logits_at is not None or layer_mask is not None):
        raise ValueError("packed tokens take token ids and every layer: not embeds, logits_at or layer_mask")
    if embeds is None:
        x = model.embed_input(model.embed(_pack(tokens, packed)))
    else:
        x = _pack(embeds.astype(model.config.jnp_dtype), None)
    rows = _rows_of(model.config, Segment(cache=cache, tokens=tokens, positions=positions, block_mask=block_mask,
                                          packed=packed))
    run = range(model.config.n_layers) if layers is None else layers
    wanted = set(hidden_layers)
    hiddens = {}
    for layer in run:
        x, cache = _masked_block(model.config, model.layers[layer], layer, x, rows, cache, layer_mask)
        if layer in wanted:
            hiddens[layer] = _unpack(x, packed, b, t)
    if missing := wanted - set(hiddens):
        raise ValueError(f"hidden_layers {sorted(missing)} are not among the layers run")
    return _outputs(model, x, rows, cache, hiddens, logits_at, compute_logits)


def forward_together(model: Llama, segments: Sequence[Segment]) -> list[ForwardOutput]:
    """Several independent forwards (each with its own cache, rows and tokens; all layers) as one:
    every matrix product runs once over all their tokens, each attends only within its own
    segment. Each output equals :func:`forward` of that segment alone (up to float rounding of
    products of other shapes). A forward of few tokens per row costs on CPU about as much as one of
    many, so e.g. a request pool prefills an admitted prompt in the same forward as a decode step."""
    rows = [_rows_of(model.config, seg) for seg in segments]
    caches = [seg.cache for seg in segments]
    x = model.embed_input(jnp.concatenate([model.embed(_pack(seg.tokens, seg.packed)) for seg in segments]))
    ends = _segment_ends(rows)
    hiddens = [{} for _ in segments]
    for layer in range(model.config.n_layers):
        x, caches = _block(model.config, model.layers[layer], layer, x, rows, caches)
        if any(layer in seg.hidden_layers for seg in segments):
            for seg, r, xs, h in zip(segments, rows, jnp.split(x, ends), hiddens):
                if layer in seg.hidden_layers:
                    h[layer] = _unpack(xs, r.packed, *r.positions.shape)
    return [_outputs(model, xs, r, c, h, seg.logits_at, True)
            for seg, r, xs, c, h in zip(segments, rows, jnp.split(x, ends), caches, hiddens)]


def teacher_forced_logits(model: Llama, tokens: jax.Array) -> jax.Array:
    """Logits ``[B, T, V]`` of whole sequences ``tokens: [B, T]`` run from an empty cache."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return forward(model, init_cache(model.config, b, t), tokens=tokens, positions=positions).logits


def head_table(model: Llama) -> jax.Array:
    """The LM head as a ``[vocab, d_model]`` table (the embedding when tied)."""
    return model.embed.embedding[...] if model.lm_head is None else model.lm_head.kernel[...].T


def fingerprint(model: Llama) -> str:
    """A short digest of a model: its shape and a sample of its weights (rounded to bfloat16, so
    float32 and bfloat16 loads of one checkpoint agree). Saved heads and drafts record their target's."""
    digest = hashlib.sha256(json.dumps(model.config.identity(), sort_keys=True, default=asdict).encode())
    for arr in (model.norm.weight[...], head_table(model)[:64], model.layers[0].attn.q.kernel[...][:, :64]):
        digest.update(np.asarray(jnp.asarray(arr, jnp.bfloat16).astype(jnp.float32)).tobytes())
    return digest.hexdigest()[:16]


def init_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A randomly initialised model (tests, drafts trained from scratch)."""
    return Llama(cfg, rngs=nnx.Rngs(seed))

"""The forward: cache consistency, ragged rows, tree masks, layer subsets, embeddings."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import full_logits
from specdec import few_rows
from specdec.cache import causal_mask, init_cache
from specdec.config import tiny_config
from specdec.model import Segment, attention_windows, forward, forward_together, init_model, teacher_forced_logits
from specdec.weights import hf_tensors, model_from_hf

TOL = 1e-5
STATIC = ("layers", "hidden_layers")


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def _forward(graphdef, state, cache, arrays: dict, static: tuple):
    return forward(nnx.merge(graphdef, state), cache, **arrays, **dict(static))


def run(model, cache, **options):
    """``forward`` under jit (one compile per shape, not one per operation); options as ``forward``'s."""
    static = tuple((k, tuple(options.pop(k))) for k in STATIC if k in options)
    return _forward(*nnx.split(model), cache, options, static)


def _tokens(b, t, seed=0, vocab=97):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_cached_steps_equal_teacher_forced_forward(tiny):
    toks = _tokens(2, 12)
    full = full_logits(tiny, toks)
    cache = init_cache(tiny.config, 2, 16)
    steps = []
    # prefill 5 tokens, then 1, then a block of 3, then 3 single steps
    for lo, hi in [(0, 5), (5, 6), (6, 9), (9, 10), (10, 11), (11, 12)]:
        pos = jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo))
        out = run(tiny, cache, tokens=toks[:, lo:hi], positions=pos)
        cache = out.cache.advance(jnp.full((2,), hi - lo))
        steps.append(out.logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=TOL, rtol=0)


def test_ragged_batch_equals_rows_alone(tiny):
    lens = [3, 9, 6]
    toks = _tokens(3, 9, seed=1)
    cache = init_cache(tiny.config, 3, 16)
    pos = jnp.broadcast_to(jnp.arange(9), (3, 9))
    out = run(tiny, cache, tokens=toks, positions=pos)  # padded prefill
    cache = out.cache.with_lengths(jnp.asarray(lens))
    nxt = _tokens(3, 2, seed=2)
    step = run(tiny, cache, tokens=nxt, positions=cache.lengths[:, None] + jnp.arange(2))
    for row, n in enumerate(lens):
        alone = full_logits(tiny, jnp.concatenate([toks[row:row + 1, :n], nxt[row:row + 1]], 1))
        np.testing.assert_allclose(out.logits[row, :n], alone[0, :n], atol=TOL, rtol=0)
        np.testing.assert_allclose(step.logits[row], alone[0, n:], atol=TOL, rtol=0)


def test_forward_together_equals_each_forward_alone(tiny):
    """A tree step over a ragged 3-row batch (one row's tokens packed away), a 1-row prefill with
    logits at its last prompt token and a hidden layer, run as one forward: each output, cache and
    hidden state is that segment's own forward's."""
    lens = jnp.asarray([4, 9, 6])
    cache = init_cache(tiny.config, 3, 32)
    toks = _tokens(3, 9, seed=5)
    cache = run(tiny, cache, tokens=toks, positions=jnp.broadcast_to(jnp.arange(9), (3, 9))).cache.with_lengths(lens)
    mask = jnp.asarray([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)  # root; two children of the root
    step = Segment(cache=cache, tokens=_tokens(3, 3, seed=6), positions=lens[:, None] + jnp.asarray([0, 1, 1]),
                   block_mask=mask, packed=jnp.asarray([0, 1, 2, 3, 6, 7]))  # row 1's children not computed
    prompt = Segment(cache=init_cache(tiny.config, 1, 32), tokens=_tokens(1, 7, seed=7),
                     positions=jnp.arange(7)[None], logits_at=jnp.asarray([[4]]), hidden_layers=(0,))
    together = jax.jit(lambda g, st: forward_together(nnx.merge(g, st), [step, prompt]), static_argnums=0)(
        *nnx.split(tiny))
    for seg, got in zip([step, prompt], together):
        alone = run(tiny, seg.cache, tokens=seg.tokens, positions=seg.positions, block_mask=seg.block_mask,
                    packed=seg.packed, logits_at=seg.logits_at, hidden_layers=seg.hidden_layers)
        for a, b in [(got.logits, alone.logits), (got.hidden, alone.hidden), (got.cache.k[1], alone.cache.k[1]),
                     (got.cache.v[0], alone.cache.v[0])] + [(got.hiddens[i], alone.hiddens[i]) for i in alone.hiddens]:
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
    assert set(together[1].hiddens) == {0} and not together[0].hiddens


def test_attention_windows():
    assert attention_windows(640, 1) == [128, 256, 512, 640]
    assert attention_windows(640, 200) == [256, 512, 640]  # a window must hold the new tokens
    assert attention_windows(512, 5) == [128, 256, 512]
    assert attention_windows(128, 1) == [128]
    assert attention_windows(100, 1) == [100]


@pytest.mark.parametrize("longest", [100, 200, 290])  # the step needs the 128-, 256- or whole 300-slot window
def test_attention_window_equals_rows_alone(tiny, longest):
    """A step over a 300-slot cache attends over the window its longest row needs; slots past it
    hold stale K/V (the padded prefill's) and must not matter."""
    lens = [7, longest]
    toks = _tokens(2, 296, seed=3)
    cache = init_cache(tiny.config, 2, 300)
    prefill = run(tiny, cache, tokens=toks[:, :293], positions=jnp.broadcast_to(jnp.arange(293), (2, 293)))
    cache = prefill.cache.with_lengths(jnp.asarray(lens))
    nxt = toks[:, 293:]
    step = run(tiny, cache, tokens=nxt, positions=cache.lengths[:, None] + jnp.arange(3))
    for row, n in enumerate(lens):
        alone = full_logits(tiny, jnp.concatenate([toks[row:row + 1, :n], nxt[row:row + 1]], 1))
        np.testing.assert_allclose(step.logits[row], alone[0, n:], atol=TOL, rtol=0)


def test_tree_mask_equals_each_branch_as_a_chain(tiny):
    prefix = _tokens(1, 5, seed=3)
    # tree: root r; children a, b of r; child c of a.  nodes: [r, a, b, c]
    nodes = jnp.asarray([[11, 22, 33, 44]])
    parent = [-1, 0, 0, 1]
    depth = jnp.asarray([[0, 1, 1, 2]])
    mask = np.eye(4, dtype=bool)
    for i, p in enumerate(parent):
        while p >= 0:
            mask[i, p] = True
            p = parent[p]
    cache = init_cache(tiny.config, 1, 16)
    cache = run(tiny, cache, tokens=prefix, positions=jnp.arange(5)[None]).cache.with_lengths(jnp.asarray([5]))
    tree = run(tiny, cache, tokens=nodes, positions=5 + depth, block_mask=jnp.asarray(mask)[None])
    for leaf_path in ([0, 1, 3], [0, 2]):
        chain = jnp.concatenate([prefix, nodes[:, leaf_path]], 1)
        ref = full_logits(tiny, chain)[0, 5:]
        np.testing.assert_allclose(tree.logits[0, jnp.asarray(leaf_path)], ref, atol=TOL, rtol=0)


def test_layer_subset_equals_smaller_model_and_hidden_states():
    cfg = tiny_config(n_layers=4)
    big = init_model(cfg, seed=5)
    small = init_model(cfg.replace(n_layers=2), seed=6)
    # copy layers 1 and 3 of the big model (and embeddings, norm) into the small one
    nnx.update(small.layers[0], nnx.state(big.layers[1]))
    nnx.update(small.layers[1], nnx.state(big.layers[3]))
    nnx.update(small.embed, nnx.state(big.embed))
    nnx.update(small.norm, nnx.state(big.norm))
    toks = _tokens(2, 7, seed=7)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    sub = run(big, init_cache(cfg, 2, 8), tokens=toks, positions=pos, layers=(1, 3), hidden_layers=(1,))
    ref = run(small, init_cache(small.config, 2, 8), tokens=toks, positions=pos, hidden_layers=(0,))
    np.testing.assert_allclose(sub.logits, ref.logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(sub.hiddens[1], ref.hiddens[0], atol=TOL, rtol=0)
    # skipped layers' cache entries are never written
    assert not jnp.any(sub.cache.k[0]) and not jnp.any(sub.cache.k[2]) and jnp.any(sub.cache.k[1])
    # an exit layer: logits after the first 2 layers equal the norm + head of the layer-1 hidden state
    early = run(big, init_cache(cfg, 2, 8), tokens=toks, positions=pos, layers=range(2), hidden_layers=(1,))
    np.testing.assert_allclose(early.logits, big.logits(big.norm(early.hiddens[1])), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="not among the layers run"):
        run(big, init_cache(cfg, 2, 8), tokens=toks, positions=pos, layers=(0,), hidden_layers=(2,))


def test_input_embeddings_equal_token_ids(tiny):
    toks = _tokens(2, 6, seed=8)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    cache = init_cache(tiny.config, 2, 8)
    by_id = run(tiny, cache, tokens=toks, positions=pos)
    by_embed = run(tiny, cache, embeds=tiny.embed(toks), positions=pos)
    np.testing.assert_allclose(by_embed.logits, by_id.logits, atol=TOL, rtol=0)
    # a mixture of embeddings is a legal input and changes the output
    mix = 0.5 * tiny.embed(toks) + 0.5 * tiny.embed((toks + 1) % 97)
    assert not np.allclose(run(tiny, cache, embeds=mix, positions=pos).logits, by_id.logits)
    with pytest.raises(ValueError, match="exactly one of tokens"):
        run(tiny, cache, tokens=toks, embeds=tiny.embed(toks), positions=pos)


def test_logits_at_and_hidden(tiny):
    toks = _tokens(2, 6, seed=9)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    cache = init_cache(tiny.config, 2, 8)
    full = run(tiny, cache, tokens=toks, positions=pos)
    at = run(tiny, cache, tokens=toks, positions=pos, logits_at=jnp.asarray([[2], [5]]))
    np.testing.assert_allclose(at.logits[:, 0], full.logits[jnp.arange(2), jnp.asarray([2, 5])], atol=TOL)
    np.testing.assert_allclose(tiny.logits(full.hidden), full.logits, atol=TOL)


def test_untied_head_bias_and_bfloat16():
    cfg = tiny_config(tie_embeddings=False, qkv_bias=True)
    model = init_model(cfg, seed=3)
    toks = _tokens(1, 6, seed=10)
    ref = full_logits(model, toks)
    assert model.lm_head is not None and ref.shape == (1, 6, 97)
    half = model_from_hf(cfg.replace(dtype="bfloat16"), hf_tensors(model).__getitem__)
    assert half.embed.embedding[...].dtype == jnp.bfloat16
    low = full_logits(half, toks)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, atol=0.1)  # same weights up to bf16 rounding


@pytest.mark.parametrize("tied", [True, False])
def test_every_product_asks_for_full_float32(tied):
    """Each matrix product of a forward (projections, attention, the head, tied or not) carries the HIGHEST
    precision, so no backend may drop to TF32 or bfloat16 passes (the GPU default) behind the checker's back.
    Traced with XLA's products, as on a GPU or TPU (the CPU's few-row kernel is float32 throughout)."""
    model = init_model(tiny_config(tie_embeddings=tied), seed=0)
    graphdef, state = nnx.split(model)
    toks = _tokens(2, 6, seed=1)
    with few_rows.xla_products():
        text = jax.jit(lambda s, t: teacher_forced_logits(nnx.merge(graphdef, s), t)).lower(state, toks).as_text()
    products = [line for line in text.splitlines() if "dot_general" in line]
    assert len(products) >= 9 * model.config.n_layers + 1, len(products)  # q k v o gate up down, 2 attention; head
    loose = [line.strip() for line in products if "precision = [HIGHEST, HIGHEST]" not in line]
    assert not loose, loose[:3]


def test_causal_mask_shape():
    m = causal_mask(2, 3)
    assert m.shape == (2, 3, 3) and bool(m[0, 2, 0]) and not bool(m[0, 0, 2])

"""Where a k-token forward's time goes on this CPU, per operation class, against its bounds.

For each width k (tokens of one row, after a committed prefix of ``--prefix`` tokens), each
operation class of the target's forward runs alone as one jitted program over every layer, the
way the forward runs it (same shapes, same product precision), timed by its median:

- ``projections``: the Q, K, V and output projections;
- ``mlp``: gate, up, activation, down;
- ``attention``: RoPE, scores over the prefix and the block, softmax, values (and the K/V write);
- ``lm_head``: the final norm and the logits over the whole vocabulary;
- ``forward``: the whole forward (``specdec.bench.forward_rounds``: the widths timed in turn, round
  by round; c(k) is the median of the rounds' ratios). The classes timed alone add up to more
  than the forward: alone, each pays its own dispatch and cannot overlap with others;
- ``forward_xla_products``: the whole forward again, in the same run, with every product through
  XLA's ``dot_general`` instead of specdec's few-row kernel (``specdec.few_rows``).

Beside each: the bandwidth bound (bytes of weights the class reads / measured read bandwidth)
and the arithmetic bound (its floating-point operations / measured float32 matrix-product peak),
and c(k) of the class and of the whole forward (time at k / time at 1).

    .venv/bin/python experiments/verify_cost_study.py [--model smollm2-135m] [--widths 1 2 3 4 6 8 12 16]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from record_results import write_results
import specdec
from specdec import few_rows
from specdec.bench import curve_rows, forward_rounds, median_time, read_bandwidth, relative_costs
from specdec.cache import init_cache, write_layer
from specdec.model import attend
from specdec.rope import apply_rotary, rotary

WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16)


def peak_flops(n: int = 1024) -> float:
    """Measured float32 matrix-product rate (flop/s) of an n x n x n product at full precision."""
    a = jnp.ones((n, n), jnp.float32)
    product = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
    product(a).block_until_ready()
    return 2 * n ** 3 / median_time(lambda: product(a).block_until_ready(), 9)


def class_programs(lm, prefix: int):
    """name -> (jitted fn(state, x, cache, positions), weight bytes it reads, flops per token)."""
    cfg = lm.config
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    item = jnp.dtype(cfg.jnp_dtype).itemsize

    def projections(state, x, cache, positions):
        model = nnx.merge(lm.graphdef, state)
        for block in model.layers:
            a = block.attn
            x = x + a.o(a.q(x)) + a.k(x).sum() + a.v(x).sum()
        return x

    def mlp(state, x, cache, positions):
        model = nnx.merge(lm.graphdef, state)
        for block in model.layers:
            x = x + block.mlp(x)
        return x

    def attention(state, x, cache, positions):
        b, t = positions.shape
        out = []
        for layer in range(cfg.n_layers):
            q = jnp.broadcast_to(x[..., None, :hd], (b, t, h, hd))
            k = jnp.broadcast_to(x[..., None, :hd], (b, t, kv, hd))
            cos, sin = rotary(positions, hd, *cfg.rope_of(layer), cfg.max_seq_len)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            cache = write_layer(cache, layer, k, k)
            visible = jnp.arange(cache.capacity)[None, None, :] <= positions[:, :, None]
            out.append(attend(cfg, q, cache.k[layer], cache.v[layer], visible, cache.lengths).sum())
        return jnp.stack(out)

    def lm_head(state, x, cache, positions):
        model = nnx.merge(lm.graphdef, state)
        return model.logits(model.norm(x))

    attn_bytes = (2 * d * h * hd + 2 * d * kv * hd) * item * cfg.n_layers
    return {
        "projections": (projections, attn_bytes, 2 * attn_bytes / item),
        "mlp": (mlp, 3 * d * f * item * cfg.n_layers, 6 * d * f * cfg.n_layers),
        "attention": (attention, 2 * kv * hd * prefix * item * cfg.n_layers, 4 * h * hd * prefix * cfg.n_layers),
        "lm_head": (lm_head, cfg.vocab_size * d * item, 2 * cfg.vocab_size * d),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    lm = specdec.load(args.model, precision="highest")
    bandwidth, peak = read_bandwidth(), peak_flops()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 product peak {peak / 1e9:.1f} GFLOP/s")
    programs = {name: (jax.jit(fn), nbytes, flops) for name, (fn, nbytes, flops) in class_programs(lm, args.prefix).items()}
    times: dict[tuple[str, int], float] = {}
    widths = sorted(set(args.widths) | {1})
    for k in tqdm(widths, desc="widths"):
        cache = init_cache(lm.config, 1, args.prefix + k).with_lengths(jnp.asarray([args.prefix]))
        x = jnp.ones((1, k, lm.config.d_model), lm.config.jnp_dtype) * 0.01
        positions = args.prefix + jnp.arange(k)[None]
        for name, (fn, _, _) in programs.items():
            jax.block_until_ready(fn(lm.state, x, cache, positions))
            times[name, k] = median_time(lambda: jax.block_until_ready(fn(lm.state, x, cache, positions)),
                                         args.repeats)
    forward = forward_rounds(lm, widths, prefix=args.prefix, repeats=args.repeats)
    with few_rows.xla_products():
        xla = forward_rounds(lm, widths, prefix=args.prefix, repeats=args.repeats)
    c_k = {"forward": relative_costs(forward), "forward_xla_products": relative_costs(xla)}
    for k in widths:
        times["forward", k], times["forward_xla_products", k] = np.median(forward[k]), np.median(xla[k])
    rows = []
    for k in widths:
        for name in (*programs, "forward", "forward_xla_products"):
            c = c_k[name][k] if name in c_k else times[name, k] / times[name, 1]
            row = {"method": name, "options": {"k": k}, "ms": round(times[name, k] * 1e3, 3), "c_k": round(c, 3)}
            if name in programs:
                _, nbytes, flops = programs[name]
                row.update(bandwidth_bound_ms=round(nbytes / bandwidth * 1e3, 3),
                           arithmetic_bound_ms=round(flops * k / peak * 1e3, 3))
            rows.append(row)
    forward, xla = c_k["forward"], c_k["forward_xla_products"]
    print("c(k) of the whole forward:", {k: round(v, 3) for k, v in forward.items()})
    print("c(k) with XLA's products:", {k: round(v, 3) for k, v in xla.items()})
    payload = {"model": args.model, "prompts": f"none: one row, a committed prefix of {args.prefix} tokens",
               "max_new_tokens": None, "read_bandwidth_GB_s": round(bandwidth / 1e9, 2),
               "float32_peak_GFLOP_s": round(peak / 1e9, 1), "few_row_kernel": few_rows.available(),
               "few_row_kernel_max_rows": few_rows.max_rows(),
               "cost_curve": curve_rows(forward), "cost_curve_xla_products": curve_rows(xla),
               "rows": rows,
               "notes": ["each class timed alone as one jitted program over every layer (medians); alone, "
                         "the classes add up to more than the forward",
                         "forward_xla_products: the forward with XLA's dot_general for every product, "
                         "beside the default forward (specdec's few-row kernel for up to "
                         f"{few_rows.max_rows()} rows, as measured for this machine); the two forwards' "
                         "widths each timed in turn, round by round, c_k the median of the rounds' ratios",
                         "bandwidth_bound_ms: weight (or, for attention, K/V cache) bytes the class reads / read "
                         "bandwidth; arithmetic_bound_ms: its flops at width k / the float32 product peak"]}
    path = write_results(f"verify_cost_study_{args.model.replace('-', '_')}", payload,
                         ["method", "k", "ms", "c_k", "bandwidth_bound_ms", "arithmetic_bound_ms"])
    print(f"wrote {path}")


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()

"""Autoregressive decoding of a real model: specdec vs Hugging Face transformers.

The model is SmolLM2-135M-Instruct (HumanEval chat prompts) or Gemma-3-270M (the base model:
HumanEval prompts as raw text, after its <bos>); transformers loads the same GGUF file.
Both run float32 on the same machine, in this one process, one after the other
(never concurrently), on the same prompts, greedy, exactly
``--new-tokens`` tokens per row (EOS ignored). Figures:

- decode tokens/s = (generated tokens - one per row) / (wall time - time to first token);
- the fraction of the memory-bandwidth limit at batch 1: tokens/s x float32 weight
  bytes read per token / measured read bandwidth (a jitted float32 mat-vec);
- equivalence of every row against transformers' greedy tokens (up to specdec's first
  EOS, past which transformers' ``min_new_tokens`` bans EOS): identical, tie
  (first divergence where the specdec top-1/top-2 logit margin is below 1e-3),
  or MISMATCH.

    make peers && .venv/bin/python experiments/bench_autoregressive.py [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from record_results import write_results
import specdec
from specdec.bench import read_bandwidth
from specdec.datasets import humaneval, humaneval_chat_prompts
from specdec.fetch import MODELS, model_file
from specdec.model import teacher_forced_logits

TIE_MARGIN = 1e-3


def specdec_run(model, prompts: list[list[int]], new_tokens: int):
    res = specdec.generate(model, prompts, max_new_tokens=new_tokens, ignore_eos=True)
    s = res[0].stats
    return [r.tokens for r in res], s.ttft_s, s.wall_s


def transformers_run(hf, prompts: list[list[int]], new_tokens: int, pad_id: int):
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=pad_id)
    with torch.no_grad():
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        wall = time.perf_counter() - start
    return [row[width:].tolist() for row in out], ttft, wall


def classify(model, prompt: list[int], ours: list[int], ref: list[int]) -> str:
    """Compare up to specdec's first EOS: past it transformers' min_new_tokens bans EOS, specdec doesn't."""
    eos = set(model.tokenizer.eos_ids)
    end = next((i for i, t in enumerate(ours) if t in eos), len(ours))
    diff = next((i for i, (a, b) in enumerate(zip(ours[:end], ref)) if a != b), None)
    if diff is None:
        return "identical"
    logits = teacher_forced_logits(model.module, jnp.asarray([prompt + ours[:diff]]))[0, -1]
    top2 = jax.lax.top_k(logits, 2)[0]
    return "tie" if float(top2[0] - top2[1]) < TIE_MARGIN else f"MISMATCH@{diff}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch1-prompts", type=int, default=3, help="prompts run one by one at batch 1")
    args = parser.parse_args()

    import torch
    import transformers

    model = specdec.load(args.model, precision="highest")
    path = model_file(args.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    n = max(max(args.batch_sizes), args.batch1_prompts)
    chat = model.tokenizer.chat_template is not None
    texts = humaneval_chat_prompts(n) if chat else [row["prompt"] for row in humaneval(n)]
    prompts = [model.tokenizer.encode_prompt(t, chat=chat) for t in texts]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.module, nnx.Param)))
    bandwidth = read_bandwidth()
    limit = bandwidth / weight_bytes
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {weight_bytes / 1e6:.0f} MB of weights per token "
          f"-> limit {limit:.1f} tokens/s at batch 1; torch threads {torch.get_num_threads()}")

    rows = []
    for batch in args.batch_sizes:
        groups = [[p] for p in prompts[:args.batch1_prompts]] if batch == 1 else [prompts[:batch]]
        figures = {}
        for name, run in [("specdec", lambda g: specdec_run(model, g, args.new_tokens)),
                          ("transformers", lambda g: transformers_run(hf, g, args.new_tokens,
                                                                      model.tokenizer.eos_ids[0]))]:
            tokens, ttfts, decode_s = [], [], 0.0
            for g in groups:
                run(g)  # warm-up: compilation for this prompt length, allocator
                toks, ttft, wall = run(g)
                tokens += toks
                ttfts.append(ttft)
                decode_s += wall - ttft
            n_decoded = sum(len(t) - 1 for t in tokens)
            figures[name] = dict(tokens=tokens, tps=n_decoded / decode_s, ttft=float(np.mean(ttfts)))
            print(f"batch {batch} {name}: {figures[name]['tps']:.1f} tokens/s, ttft {figures[name]['ttft']:.3f} s")
        flat = [p for g in groups for p in g]
        labels = [classify(model, p, a, b) for p, a, b in
                  zip(flat, figures["specdec"]["tokens"], figures["transformers"]["tokens"])]
        verdict = ("MISMATCH" if any(x.startswith("MISMATCH") for x in labels)
                   else "tie" if "tie" in labels else "identical")
        base = figures["transformers"]["tps"]
        for name in ("specdec", "transformers"):
            f = figures[name]
            row = {"method": "autoregressive" if name == "specdec" else "transformers",
                   "options": {"batch_size": batch, "dtype": "float32", "greedy": True},
                   "accepted_per_forward": 1.0, "tokens_per_s": round(f["tps"], 2),
                   "time_to_first_token_s": round(f["ttft"], 4),
                   "speedup_vs_transformers": round(f["tps"] / base, 3),
                   "equivalence": verdict if name == "specdec" else "reference",
                   "rows_equivalence": labels if name == "specdec" else None}
            if batch == 1:
                row["fraction_of_bandwidth_limit"] = round(f["tps"] / limit, 3)
            rows.append(row)
    spec = MODELS[args.model]
    payload = {
        "model": f"{args.model} ({spec.filename} from {spec.package}=={spec.version}, dequantized to float32)",
        "prompts": f"HumanEval {'chat' if chat else 'raw'} prompts: {args.batch1_prompts} one by one at batch 1, "
                   f"the first {max(args.batch_sizes)} together at larger batch",
        "max_new_tokens": args.new_tokens,
        "read_bandwidth_GB_s": round(bandwidth / 1e9, 2),
        "weight_bytes_per_token": int(weight_bytes),
        "bandwidth_limit_tokens_per_s": round(limit, 2),
        "peer": f"transformers {transformers.__version__}, torch {torch.__version__} "
                f"({torch.get_num_threads()} threads)",
        "rows": rows,
        "notes": ["tokens/s counts decode only: (tokens - 1 per row) / (wall - time to first token)",
                  "speedup is against transformers measured in the same run; "
                  "fraction_of_bandwidth_limit = tokens/s / (read bandwidth / weight bytes)"],
    }
    name = "bench_autoregressive" + ("" if args.model == "smollm2-135m" else "_" + args.model.replace("-", "_"))
    path = write_results(name, payload,
                         ["method", "batch_size", "tokens_per_s", "time_to_first_token_s",
                          "speedup_vs_transformers", "fraction_of_bandwidth_limit", "equivalence"])
    print(f"wrote {path}")


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()

"""Superposed decoding (k drafts from one pass, n-gram interpolation) vs nucleus sampling and
greedy decoding of SmolLM2-135M-Instruct, in one run.

Prefixes: the first ``--prefix-tokens`` tokens of the first assistant reply of ``--prefixes``
held-out ShareGPT conversations, as plain text (no chat template: autocompletion). Every
method writes ``--new-tokens``-token drafts (EOS may end one earlier). Per prefix, one after
the other (one process, nothing concurrent), each timed host to host through
``specdec.generate`` after compiling its shapes once:

- superposed: k drafts from one superposed pass (batch 1);
- nucleus x k: k separate nucleus-sampling runs (top-p ``--top-p``, temperature 1, batch 1);
- nucleus batch k: one nucleus run of the prefix repeated k times (seeds 0..k-1);
- greedy: one greedy run (batch 1).

Rows carry ``wall_s`` (all prefixes) and the time per prefix. Quality, with the model itself
(teacher forcing, no timing): the perplexity of each draft's tokens after its prefix, for each
superposed rank, the best of the k drafts, and the nucleus samples (mean and best of k);
diversity: distinct n-grams across the k drafts of a prefix / all n-grams (n = 1, 2, 3).

    .venv/bin/python experiments/bench_superposed.py
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np
from flax import nnx

from record_results import pyplot, save_plot, write_results
import specdec
from specdec.datasets import sharegpt
from specdec.model import teacher_forced_logits
from specdec.ngrams import default_ngram_path, load_ngrams, tokenizer_name


def prefixes(tok, n: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens of the first assistant reply of held-out conversations (n of them)."""
    out = []
    for conv in sharegpt("heldout"):
        ids = tok.encode(conv[1]["content"])
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise ValueError(f"ShareGPT's held-out split has only {len(out)} replies of {length}+ tokens, not {n}")


@functools.partial(jax.jit, static_argnames="graphdef")
def _log_probs(graphdef, state, tokens):
    return jax.nn.log_softmax(teacher_forced_logits(nnx.merge(graphdef, state), tokens), axis=-1)


def perplexities(model, prefix_ids: list[list[int]], drafts: list[list[int]], width: int = 32) -> np.ndarray:
    """Perplexity of each ``drafts[i]`` after ``prefix_ids[i]`` under ``model`` (NaN for an empty draft)."""
    out = np.full(len(drafts), np.nan)
    for start in range(0, len(drafts), 32):
        idx = list(range(start, min(len(drafts), start + 32)))
        tokens = np.zeros((32, width), np.int32)
        for row, i in enumerate(idx):
            seq = prefix_ids[i] + drafts[i]
            tokens[row, :len(seq)] = seq
        logp = np.asarray(_log_probs(model.graphdef, model.state, tokens))
        for row, i in enumerate(idx):
            p, d = len(prefix_ids[i]), drafts[i]
            if d:
                nll = -logp[row, np.arange(p - 1, p - 1 + len(d)), d]
                out[i] = float(np.exp(nll.mean()))
    return out


def distinct(drafts: list[list[int]], n: int) -> float:
    """Distinct n-grams across a prefix's drafts / all their n-grams."""
    grams = [tuple(d[i:i + n]) for d in drafts for i in range(len(d) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefixes", type=int, default=100)
    parser.add_argument("--prefix-tokens", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--ngrams", default=None, help="n-gram file (default: the model's, built if missing)")
    args = parser.parse_args()
    pyplot()  # fail now, not after the run, without matplotlib

    model = specdec.load("smollm2-135m")
    tok, k = model.tokenizer, args.k
    path = args.ngrams or default_ngram_path(model.name)
    if not args.ngrams and not path.exists():
        from specdec.ngrams import build_ngram_file

        build_ngram_file(tok, path)
    ngrams = load_ngrams(path, vocab_size=model.config.vocab_size, tokenizer=tokenizer_name(tok))
    ids = prefixes(tok, args.prefixes, args.prefix_tokens)
    common = dict(max_new_tokens=args.new_tokens, chat=False)
    nucleus = dict(temperature=1.0, top_p=args.top_p)
    methods = {
        "superposed": lambda p: specdec.generate(model, p, method="superposed", num_drafts=k, ngrams=ngrams,
                                                 **common).drafts,
        f"nucleus x {k}": lambda p: [specdec.generate(model, p, seed=s, **nucleus, **common) for s in range(k)],
        f"nucleus batch {k}": lambda p: specdec.generate(model, [p] * k, seed=list(range(k)), **nucleus, **common),
        "greedy": lambda p: [specdec.generate(model, p, **common)],
    }
    for run in methods.values():  # compile every shape once
        run(ids[0])
    spent = {name: 0.0 for name in methods}
    drafts: dict[str, list[list[list[int]]]] = {name: [] for name in methods}
    for i, p in enumerate(ids):
        for name, run in methods.items():
            start = time.perf_counter()
            out = run(p)
            spent[name] += time.perf_counter() - start
            drafts[name].append([list(d.tokens) for d in out])
        if (i + 1) % 10 == 0:
            print(f"prefix {i + 1}/{len(ids)} done", flush=True)

    rows = []
    for name in methods:
        per_prefix = drafts[name]
        width = max(len(d) for d in per_prefix)
        ranks = [perplexities(model, ids, [d[r] if r < len(d) else [] for d in per_prefix], 32)
                 for r in range(width)]
        ppl = np.stack(ranks)  # [rank, prefix]
        row = {"method": name, "wall_s": spent[name], "ms_per_prefix": 1000 * spent[name] / len(ids),
               "drafts_per_prefix": width, "ppl_mean": float(np.nanmean(ppl)),
               "ppl_best_of_k": float(np.nanmean(np.nanmin(ppl, axis=0))),
               "ppl_by_rank": [float(np.nanmean(r)) for r in ppl]}
        if width > 1:
            row.update({f"distinct_{n}": float(np.nanmean([distinct(d, n) for d in per_prefix])) for n in (1, 2, 3)})
        rows.append(row)
    sup = rows[0]["wall_s"]
    for row in rows:
        row["time_vs_superposed"] = row["wall_s"] / sup
    by = {r["method"]: r for r in rows}
    notes = [f"superposed: k={k}, alpha 0.54, tau 0.06, n_token_sample {3 * k}, lambdas 0.01/0.04/0.15/0.18/0.12 "
             f"(n = 2..6), n-grams from {ngrams.info.get('corpus')} ({path.name})",
             f"superposed is {by[f'nucleus x {k}']['wall_s'] / sup:.2f}x faster than {k} nucleus runs and "
             f"{by[f'nucleus batch {k}']['wall_s'] / sup:.2f}x faster than one batch-{k} nucleus run; "
             f"greedy takes {by['greedy']['wall_s'] / sup:.2f}x its time",
             f"best-of-{k} superposed perplexity {rows[0]['ppl_best_of_k']:.2f} vs nucleus "
             f"{by[f'nucleus x {k}']['ppl_mean']:.2f} (mean per sample; best of {k}: "
             f"{by[f'nucleus x {k}']['ppl_best_of_k']:.2f})"]
    write_results("bench_superposed", {"model": "smollm2-135m",
                                       "prompts": f"{len(ids)} held-out ShareGPT reply prefixes of "
                                                  f"{args.prefix_tokens} tokens", "new_tokens": args.new_tokens,
                                       "rows": rows, "notes": notes},
                  ["method", "wall_s", "ms_per_prefix", "time_vs_superposed", "ppl_best_of_k", "ppl_mean",
                   "ppl_by_rank", "distinct_1", "distinct_2", "distinct_3"])
    save_plot("bench_superposed", {r["method"]: ([r["ms_per_prefix"]], [r["ppl_best_of_k"]]) for r in rows},
              xlabel="wall time per prefix (ms)", ylabel="perplexity (best of the method's drafts)",
              title=f"Superposed decoding (k={k}) vs nucleus and greedy, {args.new_tokens}-token drafts")


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()

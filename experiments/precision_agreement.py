"""bfloat16 against float32 on the real models: greedy agreement, logit gaps, strict equivalence.

For each model (SmolLM2-135M-Instruct with HumanEval chat prompts, Gemma-3-270M with raw
HumanEval prompts), loaded under the "highest" (float32) and "bf16" precision policies:

- the share of prompts whose greedy continuation in bf16 equals float32's, and where the
  first difference falls;
- the largest difference of one token's logits between a 1-token and an 8-token forward
  (after a 64-token prefix), per policy: what the equivalence checker's tie tolerance of
  each precision must cover (specdec.equivalence.TIE_TOLERANCES);
- strict equivalence of prompt lookup in bf16 (the reference as wide as the method's tree):
  every row must be identical.

    .venv/bin/python experiments/precision_agreement.py [--prompts 8 --new-tokens 32]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from record_results import write_results
import specdec
from specdec.cache import init_cache
from specdec.datasets import humaneval, humaneval_chat_prompts
from specdec.equivalence import TIE_TOLERANCES, check
from specdec.model import forward

MODELS = ("smollm2-135m", "gemma3-270m")


def width_gap(model, seed: int = 0, prefix: int = 64, width: int = 8) -> float:
    """The largest |logit| difference of one token between a 1-token and a ``width``-token forward."""
    rng = np.random.default_rng(seed)
    toks = jnp.asarray(rng.integers(0, min(model.config.vocab_size, 20000), (1, prefix + width)))
    out = forward(model, init_cache(model.config, 1, 2 * prefix), tokens=toks[:, :prefix],
                  positions=jnp.arange(prefix)[None])
    cache = out.cache.advance(jnp.asarray([prefix]))
    wide = forward(model, cache, tokens=toks[:, prefix:], positions=jnp.arange(prefix, prefix + width)[None]).logits[0]
    gap = 0.0
    for i in range(width):
        one = forward(model, cache, tokens=toks[:, prefix + i:prefix + i + 1], positions=jnp.asarray([[prefix + i]]))
        cache = one.cache.advance(jnp.asarray([1]))
        gap = max(gap, float(jnp.abs(one.logits[0, 0] - wide[i]).max()))
    return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args()
    rows = []
    for name in tqdm(args.models, desc="models"):
        loaded = {policy: specdec.load(name, precision=policy) for policy in ("highest", "bf16")}
        chat = loaded["highest"].tokenizer.chat_template is not None
        texts = humaneval_chat_prompts(args.prompts) if chat else [r["prompt"] for r in humaneval(args.prompts)]
        common = dict(chat=chat, max_new_tokens=args.new_tokens, ignore_eos=True)
        outs = {policy: specdec.generate(lm, texts, **common) for policy, lm in loaded.items()}
        firsts = [next((i for i, (a, b) in enumerate(zip(x.tokens, y.tokens)) if a != b), None)
                  for x, y in zip(outs["highest"], outs["bf16"])]
        strict = check(loaded["bf16"], texts, "prompt_lookup", strict=True, batch_size=len(texts), k=4, **common)
        for policy, lm in loaded.items():
            row = {"method": "autoregressive", "options": {"model": name, "precision": policy},
                   "width_gap": round(width_gap(lm.module), 6), "tie_tolerance": TIE_TOLERANCES[policy]}
            if policy == "bf16":
                row.update(same_greedy_as_float32=f"{sum(f is None for f in firsts)}/{len(texts)}",
                           first_differences=firsts, equivalence=strict.verdict,
                           strict_prompt_lookup=f"{strict.counts['identical']}/{len(texts)} identical")
            rows.append(row)
            print(row)
    payload = {"model": ", ".join(args.models), "prompts": f"the first {args.prompts} HumanEval prompts "
               f"(chat for SmolLM2, raw for the Gemma-3-270M base model)", "max_new_tokens": args.new_tokens,
               "rows": rows,
               "notes": ["width_gap: largest |logit| difference of one token between a 1-token and an 8-token "
                         "forward after a 64-token prefix (random tokens)",
                         "same_greedy_as_float32: prompts whose bf16 greedy tokens equal float32's (EOS ignored); "
                         "first_differences: index of the first differing token per prompt (None: none)",
                         "strict_prompt_lookup: prompt lookup (k 4) in bf16 against the bf16 reference as wide "
                         "as its tree (check(strict=True))"]}
    path = write_results("precision_agreement", payload,
                         ["model", "precision", "width_gap", "tie_tolerance", "same_greedy_as_float32",
                          "strict_prompt_lookup"])
    print(f"wrote {path}")


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()

"""``make demo``: SmolLM2-135M-Instruct greedy on three HumanEval prompts.

Prints each reply, its time to first token and decode tokens/s. A warm-up call
per prompt compiles its shapes (prompt-length bucket, cache size) first, or reads
them from the compile cache of an earlier run, so the figures are steady-state.
"""

from __future__ import annotations

import time

import specdec
from specdec.datasets import humaneval_chat_prompts

MAX_NEW = 128


def main() -> None:
    start = time.perf_counter()
    model = specdec.load("smollm2-135m")
    print(f"loaded {model.name} ({model.config.n_layers} layers, {model.config.dtype}) "
          f"in {time.perf_counter() - start:.1f} s")
    prompts = humaneval_chat_prompts(3)
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        specdec.generate(model, prompt, max_new_tokens=MAX_NEW)
        warm = time.perf_counter() - start
        res = specdec.generate(model, prompt, max_new_tokens=MAX_NEW)
        print(f"=== HumanEval/{i} ({res.prompt_tokens} prompt tokens; warm-up {warm:.1f} s, compiling or reading "
              "the compile cache) ===")
        print(res.text)
        s = res.stats
        print(f"--- {len(res.tokens)} tokens ({res.finish_reason}); time to first token {s.ttft_s * 1000:.0f} ms; "
              f"{s.tokens_per_s:.1f} tokens/s\n")


if __name__ == "__main__":
    specdec.use_compile_cache()  # before the first compile
    main()

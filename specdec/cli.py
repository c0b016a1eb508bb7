"""Command line: ``specdec generate ...`` and ``specdec fetch ...``."""

from __future__ import annotations

import argparse
import sys

from specdec.api import METHODS


def _generate(args) -> int:
    import specdec

    model = specdec.load(args.model, dtype=args.dtype)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, chat=not args.no_chat, system=args.system,
                   stop=args.stop, method=args.method)
    if args.stream:
        for deltas in specdec.stream(model, args.prompt, **options):
            print(deltas[0], end="", flush=True)
        print()
        return 0
    result = specdec.generate(model, args.prompt, **options)
    print(result.text)
    s = result.stats
    print(f"[{len(result.tokens)} tokens, finish: {result.finish_reason}, time to first token "
          f"{s.ttft_s:.3f} s, {s.tokens_per_s:.1f} tokens/s (includes compilation on the first call)]",
          file=sys.stderr)
    return 0


def _fetch(args) -> int:
    from specdec.fetch import dataset_file, model_file

    for name in args.models:
        print(model_file(name))
    for name in args.datasets:
        print(dataset_file(name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--model", default="smollm2-135m", help="registry name, .gguf file or HF directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--method", default="autoregressive", choices=METHODS)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.set_defaults(func=_generate)
    fetch = sub.add_parser("fetch", help="download and verify registry models and data sets")
    fetch.add_argument("--models", nargs="*", default=["smollm2-135m"])
    fetch.add_argument("--datasets", nargs="*", default=[])
    fetch.set_defaults(func=_fetch)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        print(f"specdec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

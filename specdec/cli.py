"""Command line: ``specdec generate``, ``batch``, ``check``, ``train-heads``, ``train-draft``,
``train-feature-draft``, ``train-skipdecode``, ``build-ngrams``, ``search-tree``, ``draft-tree``, ``heads-tree``,
``tune`` and ``fetch``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from specdec.compile_cache import use_compile_cache
from specdec.config import PRECISION_POLICIES
from specdec.loading import load_once
from specdec.cli_methods import add_method_args, method_options
from specdec.method_spec import REGISTRY


def _generate(args) -> int:
    import specdec

    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, chat=not args.no_chat, system=args.system,
                   stop=args.stop, method=args.method, **method_options(args))
    model = load_once(args.model, precision=args.precision)
    if args.stream:
        for deltas in specdec.stream(model, args.prompt, **options):
            print(deltas[0], end="", flush=True)
        print()
        return 0
    result = specdec.generate(model, args.prompt, **options)
    if result.drafts is not None:
        for i, d in enumerate(result.drafts):
            print(f"--- draft {i + 1} (score {d.score:.3f}, {d.finish_reason})\n{d.text}")
        print(f"[{len(result.drafts)} drafts in {result.stats.wall_s:.3f} s (includes compilation on the first "
              f"call)]", file=sys.stderr)
        return 0
    print(result.text)
    s = result.stats
    print(f"[{len(result.tokens)} tokens, finish: {result.finish_reason}, time to first token "
          f"{s.ttft_s:.3f} s, {s.tokens_per_s:.1f} tokens/s (includes compilation on the first call), "
          f"{result.accepted_per_forward:.2f} tokens per target forward]", file=sys.stderr)
    return 0


def _read_prompts(args) -> list[str]:
    """Prompts of ``specdec batch``: a text file (one per line) or JSON Lines ({"prompt": ...}), plus data sets."""
    from specdec.datasets import humaneval_chat_prompts, sharegpt_prompts

    prompts = []
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f'{path}:{n}: expected a JSON object with a "prompt" string ({err})') from None
            else:
                prompts.append(line)
    prompts += humaneval_chat_prompts(args.humaneval) if args.humaneval else []
    prompts += sharegpt_prompts(args.sharegpt) if args.sharegpt else []
    if not prompts:
        raise ValueError("no prompts: give --prompts-file, --humaneval N or --sharegpt N")
    return prompts


def _add_prompt_args(parser: argparse.ArgumentParser, each: int) -> None:
    """The prompt sources :func:`_read_prompts` reads (``each``: default count of each data set)."""
    parser.add_argument("--prompts-file", help="one chat prompt per line, or .jsonl with a \"prompt\" per line")
    parser.add_argument("--humaneval", type=int, default=each, help="add this many HumanEval prompts")
    parser.add_argument("--sharegpt", type=int, default=each, help="add this many held-out ShareGPT prompts")


def _batch(args) -> int:
    import specdec

    options = method_options(args)
    model = load_once(args.model, precision=args.precision)
    prompts = _read_prompts(args)
    seeds = [args.seed + i for i in range(len(prompts))]
    results = specdec.generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=seeds, slots=args.slots,
                               chunk_steps=args.chunk_steps, merge_admissions=not args.prefill_alone,
                               method=args.method, **options)
    lines = "".join(json.dumps({"prompt": prompt, "seed": seed, "text": r.text, "tokens": len(r.tokens),
                                "finish_reason": r.finish_reason, "target_forwards": r.target_forwards}) + "\n"
                    for prompt, seed, r in zip(prompts, seeds, results))
    if args.output:
        Path(args.output).write_text(lines)
    else:
        print(lines, end="")
    s = results[0].stats
    busy = ", ".join(f"{u:.2f}" for u in s.slot_utilisation)
    print(f"[{len(prompts)} requests through {args.slots} slots: {s.new_tokens} tokens in {s.wall_s:.2f} s "
          f"({s.new_tokens / s.wall_s:.1f} tokens/s, includes compilation; prompt prefills {s.prefill_s:.2f} s), "
          f"{s.target_forwards} target forwards, "
          f"{s.accepted_per_forward:.2f} tokens per row-forward; slot utilisation {busy}]", file=sys.stderr)
    return 0


def _check(args) -> int:
    from specdec.datasets import humaneval, humaneval_chat_prompts
    from specdec.equivalence import check

    options = method_options(args)
    model = load_once(args.model, precision=args.precision)
    chat = model.tokenizer.chat_template is not None  # a base model without one takes raw text
    prompts = args.prompt or (humaneval_chat_prompts(args.humaneval) if chat
                              else [row["prompt"] for row in humaneval(args.humaneval)])
    report = check(model, prompts, args.method, chat=chat, batch_size=args.batch_size, tolerance=args.tolerance,
                   strict=args.strict, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, **options)
    print(report.table())
    return 1 if report.verdict == "MISMATCH" else 0


def _fetch(args) -> int:
    from specdec.fetch import dataset_file, model_file

    for name in args.models:
        print(model_file(name))
    for name in args.datasets:
        print(dataset_file(name))
    return 0


def _add_config_args(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--field-name`` flag per field of the config dataclass, defaulting to the field's default."""
    for f in dataclasses.fields(config_cls):
        kind = {bool: _flag, int: int, float: float}.get(type(f.default), str)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=f.default,
                            help=f"default: {f.default}")


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def _train(args, config_cls, run, what: str) -> int:
    """Build ``config_cls`` from the flags, ``run(cfg, max_steps=...)`` it, print its metrics."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    cfg = config_cls(**{k: v for k, v in vars(args).items() if k in fields})
    metrics = run(cfg, max_steps=args.max_steps)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=1))
    print(f"{what} saved to {cfg.out}", file=sys.stderr)
    return 0


def _train_heads(args) -> int:
    from training.medusa import HeadsTrainConfig, train_heads

    return _train(args, HeadsTrainConfig, train_heads, "heads")


def _train_draft(args) -> int:
    from training.draft import DraftTrainConfig, train_draft

    return _train(args, DraftTrainConfig, train_draft, "draft")


def _train_feature_draft(args) -> int:
    from training.feature_draft import FeatureDraftTrainConfig, train_feature_draft

    return _train(args, FeatureDraftTrainConfig, train_feature_draft, "feature draft")


def _train_skipdecode(args) -> int:
    from training.skipdecode import SkipTrainConfig, train_skipdecode

    return _train(args, SkipTrainConfig, train_skipdecode, "SkipDecode weights")


def _build_ngrams(args) -> int:
    from specdec.ngrams import build_ngram_file, default_ngram_path

    lm = load_once(args.model)
    if lm.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer to tokenise the corpus with")
    out = args.out or default_ngram_path(lm.name)
    ng = build_ngram_file(lm.tokenizer, out, source=args.corpus, max_documents=args.max_documents or None,
                          ns=tuple(args.ns))
    print(json.dumps(ng.info, indent=1))
    print(f"n-gram tables saved to {out}", file=sys.stderr)
    return 0


def _draft_tree(args) -> int:
    from heads.feature_draft import feature_draft_dir
    from training.rank_trees import write_draft_trees

    lm = load_once(args.model)
    rows = write_draft_trees(lm, feature_draft_dir(lm, args.feature_draft), args.nodes, args.out, depth=args.depth,
                             max_rank=args.max_rank)
    return _print_trees(rows, args.out, "eagle")


def _heads_tree(args) -> int:
    from training.rank_trees import write_heads_trees

    lm = load_once(args.model)
    rows = write_heads_trees(lm, args.heads, args.nodes, args.out, max_rank=args.max_rank, head_vocab=args.head_vocab)
    return _print_trees(rows, args.out, "medusa")


def _print_trees(rows: list[dict], out: str, method: str) -> int:
    for row in rows:
        cross = row["cross_tokens_per_forward"]
        print(f"{row['file']}: {row['nodes']} nodes, depth {row['depth']}, "
              f"{row['decoded_tokens_per_forward']:.3f} tokens per target forward decoding {row['heldout_replies']} "
              f"held-out replies ({row['heldout_tokens']} tokens), "
              + ("" if cross is None else f"{cross:.3f} on halves the tree was not chosen on, ")
              + f"{row['all_roots_tokens_per_forward']:.3f} averaged over every token as a root")
    print(f"written under {out} (use with --method {method} --tree FILE)", file=sys.stderr)
    return 0


def _rank_tree_parser(sub, name: str, help_text: str, max_rank: int):
    """A subcommand that writes trees of ranks (``draft-tree``, ``heads-tree``): its shared flags."""
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nodes", type=int, nargs="+", required=True, help="tree sizes (nodes besides the root)")
    parser.add_argument("--out", required=True, help="directory for tree-<nodes>.json")
    parser.add_argument("--max-rank", type=int, default=max_rank, help="ranks measured per depth (0 .. max-rank - 1)")
    return parser


def _search_tree(args) -> int:
    from heads.bundled import heads_for
    from heads.tree_search import describe, saved_accuracies, search_for_heads, search_vocab
    from training.medusa import heldout_accuracy

    topk = None
    if args.accuracy_from:  # read before the model loads: a bad file fails at once
        topk, recorded = saved_accuracies(args.accuracy_from, fix="drop --accuracy-from")
        if (recorded or None) != (args.head_vocab or None):  # 0 and None both mean every token
            raise ValueError(f"{args.accuracy_from} holds accuracies with head vocabulary {recorded or 'every token'}"
                             f", not {args.head_vocab or 'every token'}: pass --head-vocab {recorded or ''} to match "
                             "or drop --accuracy-from")
    lm = load_once(args.model)
    heads, heads_dir = heads_for(lm, args.heads)
    if topk is None:  # measured on the held-out split of the heads' own training run
        topk = heldout_accuracy(lm, heads, heads_dir, search_vocab(lm, heads_dir, args.head_vocab)[1])
    result = search_for_heads(lm, heads, heads_dir, topk, max_nodes=args.max_nodes, rows=tuple(args.rows),
                              head_vocab=args.head_vocab, save=args.save)
    print(describe(result))
    if args.save:
        print(f"saved to {heads_dir / 'tree.json'} (the default tree for these heads)", file=sys.stderr)
    return 0


def _tune(args) -> int:
    from specdec.api import encode_prompts
    from specdec.bench import device_label
    from specdec.tune import save_schedule, tune

    prompts = _read_prompts(args)
    model = load_once(args.model)
    fixed = method_options(args)
    choices = args.choices and [int(c) if REGISTRY[args.method].tuned == "k" else c for c in args.choices]
    tuned = tune(model, args.method, encode_prompts(model, prompts, True, None), rows=args.rows, choices=choices,
                 budgets=args.budgets, widths=args.widths, steps=args.steps, chunks=args.chunks, options=fixed,
                 prune=args.prune, progress=lambda line: print(line, file=sys.stderr, flush=True))
    for row in tuned.rows:
        if row.get("skipped"):
            print(f"{row['rows']:>4} rows  {row['setting']:<28} skipped: at most "
                  f"{row['bound_x_vs_autoregressive']:.3f}x autoregressive (verifying costs "
                  f"{row['verify_cost']:.2f} one-token forwards)")
            continue
        print(f"{row['rows']:>4} rows  {row['setting']:<28} {row['tokens_per_s']:8.1f} tokens/s  "
              f"{row['x_vs_autoregressive']:.3f}x autoregressive{'  <- chosen' if row.get('chosen') else ''}")
    print(json.dumps(tuned.options))
    if args.out:
        import datetime

        save_schedule(tuned, args.out, device=device_label(), date=datetime.date.today().isoformat(),
                      model=args.model, prompts=len(prompts), fixed_options=fixed)
        print(f"saved to {args.out} (use it with --schedule {args.out})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--model", default="smollm2-135m", help="registry name, .gguf file or HF directory")
    gen.add_argument("--prompt", required=True)
    add_method_args(gen, "autoregressive")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--precision", default=None, choices=list(PRECISION_POLICIES),
                     help="precision policy (default: highest on CPU, bf16 on GPU/TPU)")
    gen.set_defaults(func=_generate)
    bat = sub.add_parser("batch", help="decode many prompts through a request pool (continuous batching); "
                                       "JSON Lines out, in input order")
    bat.add_argument("--model", default="smollm2-135m", help="registry name, .gguf file or HF directory")
    _add_prompt_args(bat, 0)
    bat.add_argument("--slots", type=int, default=8, help="batch rows on device")
    bat.add_argument("--chunk-steps", type=int, default=None, help="on-device steps between admissions (16)")
    bat.add_argument("--prefill-alone", action="store_true",
                     help="prefill each admitted prompt by itself, not in a decode step of the running rows")
    add_method_args(bat, "autoregressive")
    bat.add_argument("--max-new-tokens", type=int, default=128)
    bat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    bat.add_argument("--top-k", type=int, default=0)
    bat.add_argument("--top-p", type=float, default=1.0)
    bat.add_argument("--seed", type=int, default=0, help="request i samples with seed + i")
    bat.add_argument("--output", help="JSON Lines file (default: standard output)")
    bat.add_argument("--precision", default=None, choices=list(PRECISION_POLICIES),
                     help="precision policy (default: highest on CPU, bf16 on GPU/TPU)")
    bat.set_defaults(func=_batch)
    chk = sub.add_parser("check", help="compare a method with autoregressive decoding, row by row "
                                       "(exit status 1 on any MISMATCH)")
    chk.add_argument("--model", default="smollm2-135m")
    add_method_args(chk, "prompt_lookup")
    chk.add_argument("--prompt", action="append",
                     help="a prompt (repeatable; a chat request where the model has a chat template, else raw "
                          "text); default: HumanEval prompts")
    chk.add_argument("--humaneval", type=int, default=20, help="how many HumanEval prompts (without --prompt)")
    chk.add_argument("--batch-size", type=int, default=1, help="rows per batch for the method")
    chk.add_argument("--max-new-tokens", type=int, default=64)
    chk.add_argument("--temperature", type=float, default=0.0)
    chk.add_argument("--top-k", type=int, default=0)
    chk.add_argument("--top-p", type=float, default=1.0)
    chk.add_argument("--seed", type=int, default=0)
    chk.add_argument("--tolerance", type=float, default=None,
                     help="score gap below which a divergence is a tie (default: by precision, 1e-3 in float32)")
    chk.add_argument("--strict", action="store_true",
                     help="reference as wide as the method's tree, same batches, no ties allowed")
    chk.add_argument("--precision", default=None, choices=list(PRECISION_POLICIES),
                     help="precision policy (default: highest on CPU, bf16 on GPU/TPU)")
    chk.set_defaults(func=_check)
    th = sub.add_parser("train-heads", help="train Medusa heads on a frozen model (Medusa-1; resumable)")
    from training.medusa import HeadsTrainConfig

    _add_config_args(th, HeadsTrainConfig)
    th.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    th.set_defaults(func=_train_heads)
    td = sub.add_parser("train-draft", help="train a small draft model for a target by distillation (resumable)")
    from training.draft import DraftTrainConfig

    _add_config_args(td, DraftTrainConfig)
    td.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    td.set_defaults(func=_train_draft)
    tf = sub.add_parser("train-feature-draft", help="train an EAGLE-style feature draft for a target (resumable)")
    from training.feature_draft import FeatureDraftTrainConfig

    _add_config_args(tf, FeatureDraftTrainConfig)
    tf.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    tf.set_defaults(func=_train_feature_draft)
    tsk = sub.add_parser("train-skipdecode", help="fine-tune a model with the SkipDecode layer schedule active "
                                                   "(resumable)")
    from training.skipdecode import SkipTrainConfig

    _add_config_args(tsk, SkipTrainConfig)
    tsk.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    tsk.set_defaults(func=_train_skipdecode)
    ng = sub.add_parser("build-ngrams", help="count n-grams (n = 2..6) of a corpus with a model's tokenizer "
                                             "(for --method superposed)")
    ng.add_argument("--model", default="smollm2-135m")
    ng.add_argument("--corpus", default="sharegpt", help="\"sharegpt\" (training split), a .jsonl file (\"text\" "
                                                         "or conversations per line) or a text file (blank-line "
                                                         "separated documents)")
    ng.add_argument("--max-documents", type=int, default=5000, help="documents (conversations) used; 0 = all")
    ng.add_argument("--ns", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="n-gram orders")
    ng.add_argument("--out", default=None, help="output .npz (default: the model's file in the specdec cache)")
    ng.set_defaults(func=_build_ngrams)
    ts = sub.add_parser("search-tree", help="search the Medusa tree that is fastest on this device "
                                            "(measured head accuracies x measured step cost)")
    ts.add_argument("--model", default="smollm2-135m")
    ts.add_argument("--heads", default=None, help="heads directory (default: the bundled heads for the model)")
    ts.add_argument("--max-nodes", type=int, default=64, help="largest tree tried (nodes besides the root)")
    ts.add_argument("--rows", type=int, nargs="+", default=[1], help="batch sizes (running rows) to search a tree "
                    "for, from 1; with several, method medusa picks them by load (e.g. --rows 1 2 4 8 16)")
    ts.add_argument("--accuracy-from", default=None, help="reuse the held-out head accuracies recorded in this "
                    "tree.json instead of measuring them again")
    ts.add_argument("--head-vocab", type=int, default=None, help="heads that propose only the N tokens they were "
                    "most often trained on: accuracies and costs measured so; with --save, the heads' default "
                    "(default: their default, as decoding; 0: every token)")
    ts.add_argument("--save", action="store_true", help="write tree.json beside the heads (their default tree)")
    ts.set_defaults(func=_search_tree)
    dt = _rank_tree_parser(sub, "draft-tree", "trees of draft ranks for a feature draft (--method eagle --tree): the "
                           "rank paths most often right on its held-out text", max_rank=8)
    dt.add_argument("--feature-draft", default=None, help="feature draft directory (default: the bundled one)")
    dt.add_argument("--depth", type=int, default=8, help="deepest path measured")
    dt.set_defaults(func=_draft_tree)
    ht = _rank_tree_parser(sub, "heads-tree", "Medusa trees of head ranks (--method medusa --tree): the rank paths "
                           "most often right on the heads' held-out text", max_rank=16)
    ht.add_argument("--heads", default=None, help="heads directory (default: the bundled heads for the model)")
    ht.add_argument("--head-vocab", type=int, default=None, help="heads ranking only the N tokens they were most "
                    "often trained on (default: as they decode; 0: every token)")
    ht.set_defaults(func=_heads_tree)
    tu = sub.add_parser("tune", help="measure which k (or Medusa tree) and budget decode fastest on this device at "
                                     "each number of running rows: a by-load schedule (for --schedule)")
    tu.add_argument("--model", default="smollm2-135m")
    add_method_args(tu, "prompt_lookup", tuning=True)
    tu.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="running-row counts to tune for, "
                    "from 1 (a larger load takes the largest below it)")
    tu.add_argument("--choices", nargs="+", help="k values (draft, prompt_lookup) or trees (medusa) to try "
                    "(default: 0 1 2 4, or chain-0 chain-1 chain-2 tree-8 tree-16)")
    tu.add_argument("--budgets", type=int, nargs="+", help="budgets tried beside no cap (default 1 2 4)")
    tu.add_argument("--widths", type=int, nargs="+", help="draft widths (candidates per depth) to try with each k "
                    "and pick by load too (--method draft, eagle, prompt_lookup; default: not tuned)")
    _add_prompt_args(tu, 4)
    tu.add_argument("--steps", type=int, default=8, help="steps per timed chunk")
    tu.add_argument("--chunks", type=int, default=6, help="chunks per setting (the first compiles, untimed)")
    tu.add_argument("--no-prune", dest="prune", action="store_false", help="measure every setting at every load "
                    "(default: above one row, skip those the target's measured cost curve says cannot beat "
                    "autoregressive decoding there)")
    tu.add_argument("--out", help="save the schedule (with the numeric options it was tuned with, e.g. "
                    "--draft-width) and every measurement as JSON")
    tu.set_defaults(func=_tune)
    fetch = sub.add_parser("fetch", help="download and verify registry models and data sets")
    fetch.add_argument("--models", nargs="*", default=["smollm2-135m"])
    fetch.add_argument("--datasets", nargs="*", default=[])
    fetch.set_defaults(func=_fetch)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    use_compile_cache()
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        print(f"specdec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

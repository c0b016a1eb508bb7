"""The Python API: ``specdec.generate`` and ``specdec.stream``."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from specdec.autoregressive import decode, plan_shapes
from specdec.engine import speculative_decode
from specdec.loading import LoadedModel, load
from specdec.methods import METHOD_OPTIONS, build_proposer
from specdec.sampling import Sampling


@dataclass
class DecodeStats:
    """Timing and work of one batch decode (shared by its rows)."""

    ttft_s: float  # prompt prefill + first token, host to host
    wall_s: float  # whole decode
    new_tokens: int  # tokens generated, all rows
    target_forwards: int  # decode-loop forwards of the target (prefill excluded)
    rows: int = 1
    proposer_s: float | None = None  # with profile=True: wall time spent proposing (all steps)
    target_s: float | None = None  # with profile=True: wall time of target forward + verify + commit

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput after the first token, all rows together."""
        rest = self.wall_s - self.ttft_s
        return (self.new_tokens - self.rows) / rest if rest > 0 else float("nan")


@dataclass
class Generation:
    """One row's result. ``tokens`` exclude the prompt and a final EOS token."""

    tokens: list[int]
    text: str | None
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    prompt_tokens: int
    stats: DecodeStats
    target_forwards: int = 0  # decode-loop target forwards this row took part in
    accepted_per_forward: float = float("nan")  # tokens after the first per target forward (1 for autoregressive)
    accepted_histogram: list[int] | None = None  # speculative: steps that accepted 0, 1, ... draft tokens


@functools.lru_cache(maxsize=4)
def _load_cached(name: str) -> LoadedModel:
    return load(name)


def _resolve(model) -> LoadedModel:
    return _load_cached(model) if isinstance(model, str) else model


def _encode(lm: LoadedModel, prompts, chat: bool, system: str | None) -> list[list[int]]:
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if lm.tokenizer is None:
                raise ValueError(f"model {lm.name!r} has no tokenizer: pass token id lists instead of text")
            if not prompt:
                raise ValueError(f"prompt {i} is empty: give some text")
            prompt = lm.tokenizer.encode(lm.tokenizer.chat(prompt, system) if chat else prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < lm.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {lm.config.vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


def _per_row(value, n: int, what: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} prompts")
    return [int(v) for v in values]


class _Run:
    """Shared set-up of generate/stream: encoded prompts, shapes, stop handling."""

    def __init__(self, model, prompts, *, max_new_tokens, temperature, top_k, top_p, seed, chat,
                 system, stop, stop_tokens, ignore_eos, max_cache_len, method, chunk_steps, **method_options):
        self.lm = _resolve(model)
        built = build_proposer(method, self.lm, method_options)
        self.proposer, self.pparams = built if built is not None else (None, None)
        self.rule = method_options.get("verification") or "exact"
        self.times = [] if method_options.get("profile") else None
        self.single = isinstance(prompts, str) or (
            len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        prompts = [prompts] if self.single else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        self.sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        self.ids = _encode(self.lm, prompts, chat, system)
        self.max_new = _per_row(max_new_tokens, len(prompts), "max_new_tokens")
        self.seeds = _per_row(seed, len(prompts), "seed")
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        if self.stop and self.lm.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        self.width = 1 if method_options.get("block_width") is None else method_options["block_width"]
        if int(self.width) != self.width or self.width < 1:
            raise ValueError(f"block_width must be an integer >= 1, got {self.width}")
        extra = self.proposer.tree.size if self.proposer is not None else self.width - 1
        self.shapes = plan_shapes(self.lm.config, [len(p) for p in self.ids], self.max_new, max_cache_len, extra)
        tok = self.lm.tokenizer
        eos = set(tok.eos_ids) if tok is not None and not ignore_eos else set()
        self.eos = tuple(sorted(eos | set(stop_tokens or ())))
        self.chunk_steps = chunk_steps if (chunk_steps or not self.stop) else 16
        self.stopped = [None] * len(prompts)

    def states(self):
        """Yield the decode state (``DecodeState``, or ``SpecState`` with ``.dec``) after each chunk."""
        common = dict(max_new=self.max_new, seeds=self.seeds, sampling=self.sampling, eos_ids=self.eos,
                      shapes=self.shapes, chunk_steps=self.chunk_steps)
        if self.proposer is None:
            gen = decode(self.lm.graphdef, self.lm.state, self.ids, width=self.width, **common)
        else:
            gen = speculative_decode(self.lm.graphdef, self.lm.state, self.proposer, self.pparams, self.ids,
                                     rule=self.rule, times=self.times, **common)
        st = next(gen)
        while True:
            yield st
            st = self._apply_stops(st)
            try:
                st = gen.send(st)
            except StopIteration:
                return

    def _apply_stops(self, st):
        if not self.stop:
            return st
        dec = _dec(st)
        out, n_out, done = np.asarray(dec.out), np.asarray(dec.n_out), np.array(dec.done)
        for row in range(len(self.ids)):
            if self.stopped[row] is None:
                self.stopped[row] = self._find_stop(out[row, :n_out[row]])
                done[row] |= self.stopped[row] is not None
        dec = dec.replace(done=done)
        return dec if st is _dec(st) else st.replace(dec=dec)

    def _find_stop(self, toks: np.ndarray) -> tuple[int, int] | None:
        """(character where the first stop string starts, tokens needed to produce it) or None."""
        decode = self.lm.tokenizer.decode
        hits = [decode(toks).find(s) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if not hits:
            return None
        n = next(n for n in range(1, len(toks) + 1) if any(s in decode(toks[:n]) for s in self.stop))
        return min(hits), n

    def row_tokens(self, st, row: int) -> tuple[list[int], str]:
        st = _dec(st)
        toks = np.asarray(st.out[row, :int(st.n_out[row])]).tolist()
        if self.stopped[row] is not None:
            return toks[:self.stopped[row][1]], "stop"
        if toks and toks[-1] in self.eos:
            return toks[:-1], "eos"
        return toks, "length"

    def text(self, toks: list[int], row: int) -> str | None:
        if self.lm.tokenizer is None:
            return None
        text = self.lm.tokenizer.decode(toks)
        return text[:self.stopped[row][0]] if self.stopped[row] is not None else text


def _dec(st):
    """The ``DecodeState`` inside an autoregressive or speculative state."""
    return getattr(st, "dec", st)


_METHOD_OPTIONS = sorted({o for opts in METHOD_OPTIONS.values() for o in opts})
_DEFAULTS = dict(max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0, chat=True,
                 system=None, stop=None, stop_tokens=None, ignore_eos=False, max_cache_len=None,
                 method="autoregressive", **{o: None for o in _METHOD_OPTIONS})


def generate(model, prompts, **options) -> Generation | list[Generation]:
    """Generate continuations of one prompt or a batch of prompts.

    Args:
      model: a ``LoadedModel`` or a name/path for ``specdec.load``.
      prompts: a string, a list of strings, a token id list, or a list of token id lists.
      max_new_tokens: int or one per prompt (default 128).
      temperature, top_k, top_p: sampling (temperature 0 = greedy, the default).
      seed: int or one per prompt; a row's samples depend only on its seed and positions.
      chat: apply the model's chat template to text prompts (default True); system: its system prompt.
      stop: a string or list of strings that end a row (the text is cut before it).
      stop_tokens: token ids that end a row, besides the tokenizer's EOS ids.
      ignore_eos: do not stop at the tokenizer's EOS ids (benchmarks of fixed length).
      max_cache_len: KV cache positions per row (default: the model's context length).
      method: "autoregressive" (default), "draft" (a draft model proposes), "prompt_lookup"
        (n-gram match against the row's own context) or "medusa" (Medusa heads propose a tree).
        Speculative options:
        draft: the draft model (``LoadedModel``, registry name or path; same vocabulary);
        k: draft tokens per step (default 4); draft_width: candidates per depth (default 1, a chain);
        max_ngram, min_ngram: prompt lookup's n-gram sizes (default 3 and 1);
        heads: Medusa heads (``MedusaHeads`` or a saved directory; default: the heads bundled for
        the model); tree: a built-in tree name, a JSON file or a list of paths (default: the
        searched tree saved with the heads, else "tree-16");
        verification: "exact" (default; greedy, or coupled sampling: token-identical to
        autoregressive with the same seeds), "rejection" (lossless speculative sampling, exact
        in distribution) or "typical" (Medusa typical acceptance, LOSSY);
        profile: time proposer and target apart (steps driven from the host, slower), reported
        in ``stats.proposer_s`` and ``stats.target_s``.
        block_width (autoregressive only): run each step as a forward over this many tokens
        (the newest plus hidden padding): the strict reference for a speculative method whose
        candidate tree has this many nodes (see ``specdec.equivalence.check(strict=True)``).
    Returns:
      a ``Generation`` for a single prompt, else a list in input order.
    """
    unknown = set(options) - set(_DEFAULTS) - {"chunk_steps"}
    if unknown:
        raise TypeError(f"unknown generate options {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    run = _Run(model, prompts, **{**_DEFAULTS, "chunk_steps": None, **options})
    start = time.perf_counter()
    ttft = None
    for st in run.states():
        if ttft is None:
            _dec(st).last.block_until_ready()
            ttft = time.perf_counter() - start
    wall = time.perf_counter() - start
    rows = [run.row_tokens(st, r) for r in range(len(run.ids))]
    dec = _dec(st)
    stats = DecodeStats(ttft_s=ttft, wall_s=wall, new_tokens=int(np.sum(dec.n_out)),
                        target_forwards=int(dec.forwards), rows=len(rows))
    if run.times is not None:
        stats.proposer_s = sum(t.proposer_s for t in run.times)
        stats.target_s = sum(t.target_s for t in run.times)
    if dec is st:  # autoregressive: one forward per token after the first
        forwards = [int(n) - 1 for n in np.asarray(dec.n_out)]
        hists = [None] * len(rows)
    else:
        forwards = np.asarray(st.row_forwards).tolist()
        hists = np.asarray(st.accepted_hist).tolist()
    n_out = np.asarray(dec.n_out)
    results = [Generation(tokens=toks, text=run.text(toks, r), finish_reason=why, prompt_tokens=len(run.ids[r]),
                          stats=stats, target_forwards=forwards[r], accepted_histogram=hists[r],
                          accepted_per_forward=float(n_out[r] - 1) / forwards[r] if forwards[r] else float("nan"))
               for r, (toks, why) in enumerate(rows)]
    return results[0] if run.single else results


def stream(model, prompts, *, chunk_steps: int = 8, **options) -> Iterator[list[str]]:
    """Like ``generate`` but yields, after each on-device chunk, each row's new text."""
    run = _Run(model, prompts, **{**_DEFAULTS, **options, "chunk_steps": chunk_steps})
    if run.lm.tokenizer is None:
        raise ValueError("stream needs a tokenizer to produce text; use generate with token ids")
    shown = [""] * len(run.ids)
    for st in run.states():
        texts = [run.text(run.row_tokens(st, r)[0], r) for r in range(len(run.ids))]
        # hold back a trailing replacement char: a multi-byte character may be incomplete
        texts = [t[:-1] if t.endswith("\ufffd") else t for t in texts]
        yield [t[len(s):] for t, s in zip(texts, shown)]
        shown = texts

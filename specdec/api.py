"""The Python API: ``specdec.generate`` and ``specdec.stream``."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from specdec.autoregressive import DecodeShapes, StepConfig, decode, plan_shapes, prompt_arrays, prompt_bucket
from specdec.engine import by_load, speculative_decode, whole_number
from specdec.loading import LoadedModel, as_model
from specdec.method_spec import MethodSpec, all_options, method_spec
from specdec.methods import build_proposer
from specdec.pool import SlotUse, admit_autoregressive, admit_speculative, dec_of, pool_states, put_rows
from specdec.sampling import Sampling
from specdec.skipdecode import finetuned_for, schedule_for


@dataclass
class DecodeStats:
    """Timing and work of one batch decode (shared by its rows)."""

    ttft_s: float  # prompt prefill + first token, host to host
    wall_s: float  # whole decode
    new_tokens: int  # tokens generated, all rows
    target_forwards: int  # decode-loop forwards of the target (prefill excluded)
    rows: int = 1
    row_forwards: int = 0  # target forwards summed over rows (a row counts the steps it took part in)
    slot_utilisation: list[float] | None = None  # with slots=: share of the pool's forwards each slot was busy
    prefill_s: float | None = None  # wall time of the prompts' prefills (the first rows, then each admitted
    # request; compilation included on a first call), of which ttft_s holds the first
    mean_active_layers: float | None = None  # method="skipdecode": mean layers per generated position
    proposer_s: float | None = None  # with profile=True: wall time spent proposing (all steps)
    target_s: float | None = None  # with profile=True: wall time of target forward + verify + commit

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput after the first token, all rows together."""
        rest = self.wall_s - self.ttft_s
        return (self.new_tokens - self.rows) / rest if rest > 0 else float("nan")

    @property
    def accepted_per_forward(self) -> float:
        """Tokens after each row's first per row-forward, all rows together (1 for autoregressive)."""
        return (self.new_tokens - self.rows) / self.row_forwards if self.row_forwards else float("nan")


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
    drafts: list[Draft] | None = None  # method="superposed": the k drafts, best first (tokens/text: the best)


@dataclass
class Draft:
    """One of superposed decoding's drafts: ``tokens`` exclude a final EOS token."""

    tokens: list[int]
    text: str | None
    score: float  # sum over its steps of the interpolated LM + n-gram log-probabilities
    finish_reason: str  # "eos" or "length"


def encode_prompts(lm: LoadedModel, prompts, chat: bool, system: str | None) -> list[list[int]]:
    """Token ids of each prompt as ``generate`` feeds them: text through the chat template (``chat``,
    ``system``) and the tokenizer, id lists checked against the vocabulary."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if lm.tokenizer is None:
                raise ValueError(f"model {lm.name!r} has no tokenizer: pass token id lists instead of text")
            if not prompt:
                raise ValueError(f"prompt {i} is empty: give some text")
            prompt = lm.tokenizer.encode_prompt(prompt, chat=chat, system=system)
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


def _is_single(prompts) -> bool:
    """One prompt (a string or a list of token ids) rather than a list of prompts."""
    return isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))


class _Run:
    """Shared set-up of generate/stream: encoded prompts, shapes, stop handling; the ``Requests``
    the pool (``specdec.pool``) decodes, and each request's outcome once it finished."""

    def __init__(self, model, prompts, spec: MethodSpec, o: GenerateOptions):
        self.lm = as_model(model)
        self.spec, self.method, method_options = spec, spec.name, spec.options()  # an option a method lacks: None
        self.schedule = None
        if self.method == "skipdecode":
            if o.slots is not None:
                raise ValueError("method 'skipdecode' shares one layer schedule across a batch's steps, so rows "
                                 "cannot join mid-way: drop slots= (decode the prompts as one batch)")
            if method_options.get("weights") is not None:
                self.lm = finetuned_for(self.lm, method_options["weights"])
        built = build_proposer(spec, self.lm)
        self.proposer, self.pparams = built if built is not None else (None, None)
        self.rule = method_options.get("verification") or "exact"
        self.times = [] if method_options.get("profile") else None
        self.single = _is_single(prompts)
        prompts = [prompts] if self.single else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        self.sampling = Sampling(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p)
        self.ids = encode_prompts(self.lm, prompts, o.chat, o.system)
        self.n = len(self.ids)
        self.max_new = _per_row(o.max_new_tokens, self.n, "max_new_tokens")
        self.seeds = _per_row(o.seed, self.n, "seed")
        self.stop = [o.stop] if isinstance(o.stop, str) else list(o.stop or [])
        if self.stop and self.lm.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        self.width = 1 if method_options.get("block_width") is None else method_options["block_width"]
        self.width = whole_number(self.width, "block_width", 1)
        self.slots = self.n if o.slots is None else whole_number(o.slots, "slots (batch rows on device)", 1)
        extra = self.proposer.tree.size if self.proposer is not None else self.width - 1
        self.shapes = plan_shapes(self.lm.config, [len(p) for p in self.ids], self.max_new, o.max_cache_len, extra)
        tok = self.lm.tokenizer
        eos = set(tok.eos_ids) if tok is not None and not o.ignore_eos else set()
        self.eos = tuple(sorted(eos | set(o.stop_tokens or ())))
        pooled = o.slots is not None
        self.chunk_steps = o.chunk_steps or (POOL_CHUNK_STEPS if self.stop or pooled else None)
        self.end_on_finish = pooled and self.slots > 1  # a freed slot refills at once (one slot: no-op)
        early_exit = self.proposer is not None and hasattr(by_load(self.proposer).steps[0][1], "verify_from")
        self.merge_admissions = o.merge_admissions and not early_exit  # SkipDecode: no slots=, no admissions
        self.stopped = [None] * self.n
        self.outcomes: list[tuple[list[int], int, list[int] | None] | None] = [None] * self.n
        self.use = SlotUse()

    def shapes_of(self, requests: list[int]) -> DecodeShapes:
        """The run's shapes for a batch of ``requests``: their rows and their prompt bucket."""
        return dataclasses.replace(self.shapes, batch=len(requests),
                                   prompt=prompt_bucket(max(len(self.ids[r]) for r in requests)))

    def start(self, requests: list[int]) -> Iterator:
        """The decode generator over ``requests`` (indices into the prompts)."""
        shapes = self.shapes_of(requests)
        common = dict(max_new=[self.max_new[r] for r in requests], seeds=[self.seeds[r] for r in requests],
                      config=StepConfig(sampling=self.sampling, eos_ids=self.eos, shapes=shapes,
                                        chunk_steps=self.chunk_steps, end_on_finish=self.end_on_finish))
        ids = [self.ids[r] for r in requests]
        if self.method == "skipdecode":
            end = max(len(i) for i in ids)
            self.schedule = schedule_for(self.lm.config.n_layers, self.spec, prompt_end=end,
                                         max_length=end + max(common["max_new"]))
            return decode(self.lm.graphdef, self.lm.state, ids, layer_masks=self.schedule.step_masks(shapes.out),
                          **common)
        if self.proposer is None:
            return decode(self.lm.graphdef, self.lm.state, ids, width=self.width, **common)
        return speculative_decode(self.lm.graphdef, self.lm.state, self.proposer, self.pparams, ids,
                                  rule=self.rule, times=self.times, **common)

    def admit(self, state, slot: int, request: int, running: int):
        """``state`` after one step of its ``running`` rows with ``request`` prefilled into batch row
        ``slot`` in the same target forward (see ``specdec.pool``)."""
        arrays = prompt_arrays([self.ids[request]], self.shapes_of([request]), [self.max_new[request]],
                               [self.seeds[request]])
        common = dict(sampling=self.sampling, eos_ids=self.eos)
        if self.proposer is None:
            state, new = admit_autoregressive(self.lm.graphdef, self.lm.state, state, *arrays, width=self.width,
                                              **common)
        else:
            state, new = admit_speculative(self.lm.graphdef, self.lm.state, by_load(self.proposer).pick(running),
                                           self.pparams, state, *arrays, rule=self.rule, **common)
        return put_rows(state, jnp.asarray([slot], jnp.int32), new)

    def states(self) -> Iterator[tuple]:
        """``(state, request in each batch row)`` after prefill and after each chunk."""
        return pool_states(self, self.slots, self.use)

    def apply_stops(self, st, rows: list[int | None]):
        if not self.stop:
            return st
        dec = dec_of(st)
        out, n_out, done = np.asarray(dec.out), np.asarray(dec.n_out), np.array(dec.done)
        for i, r in enumerate(rows):
            if r is not None and self.stopped[r] is None:
                self.stopped[r] = self._find_stop(out[i, :n_out[i]])
                done[i] |= self.stopped[r] is not None
        dec = dec.replace(done=done)
        return dec if st is dec_of(st) else st.replace(dec=dec)

    def harvest(self, st, row: int, request: int) -> int:
        """Keep the finished ``request``'s tokens from batch ``row``; returns its target forwards."""
        dec = dec_of(st)
        n_out = int(np.asarray(dec.n_out)[row])
        toks = np.asarray(dec.out)[row, :n_out].tolist()
        if dec is st:  # autoregressive: one forward per token after the first
            forwards, hist = n_out - 1, None
        else:
            forwards, hist = int(np.asarray(st.row_forwards)[row]), np.asarray(st.accepted_hist)[row].tolist()
        self.outcomes[request] = (toks, forwards, hist)
        return forwards

    def _find_stop(self, toks: np.ndarray) -> tuple[int, int] | None:
        """(character where the first stop string starts, tokens needed to produce it) or None."""
        decode = self.lm.tokenizer.decode
        hits = [decode(toks).find(s) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if not hits:
            return None
        n = next(n for n in range(1, len(toks) + 1) if any(s in decode(toks[:n]) for s in self.stop))
        return min(hits), n

    def cut(self, toks: list[int], request: int) -> tuple[list[int], str]:
        """A request's tokens without a final EOS or what follows a stop string, and why it ended."""
        if self.stopped[request] is not None:
            return toks[:self.stopped[request][1]], "stop"
        if toks and toks[-1] in self.eos:
            return toks[:-1], "eos"
        return toks, "length"

    def text(self, toks: list[int], request: int) -> str | None:
        if self.lm.tokenizer is None:
            return None
        text = self.lm.tokenizer.decode(toks)
        return text[:self.stopped[request][0]] if self.stopped[request] is not None else text


POOL_CHUNK_STEPS = 16
"""On-device steps between host visits when the host has work between chunks (stop strings, a pool)."""

@dataclass(frozen=True, kw_only=True)
class GenerateOptions:
    """``generate``'s options other than the method's (documented there)."""

    max_new_tokens: int | Sequence[int] = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | Sequence[int] = 0
    chat: bool = True
    system: str | None = None
    stop: str | Sequence[str] | None = None
    stop_tokens: Sequence[int] | None = None
    ignore_eos: bool = False
    max_cache_len: int | None = None
    slots: int | None = None
    chunk_steps: int | None = None
    merge_admissions: bool = True


def _split(options: dict) -> tuple[MethodSpec, GenerateOptions]:
    """``generate``'s keyword options as (the method's spec, the others)."""
    methods = all_options()  # read now: a method registered after import is known too
    general = {f.name for f in dataclasses.fields(GenerateOptions)}
    known = {"method", *general, *methods}
    if unknown := set(options) - known:
        raise TypeError(f"unknown generate options {sorted(unknown)}; known: {sorted(known)}")
    spec = method_spec(options.get("method", "autoregressive"), {o: v for o, v in options.items() if o in methods})
    return spec, GenerateOptions(**{o: v for o, v in options.items() if o in general})


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
      slots: decode through a request pool of this many batch rows (continuous batching): a chunk
        ends once a row finishes; between chunks finished rows leave, waiting prompts are prefilled
        into the free rows, and once none wait the batch shrinks to the rows still running.
        Outputs do not depend on it.
        Default: every prompt in one batch. ``stats.slot_utilisation`` reports each slot's busy share.
      merge_admissions: with slots, prefill a prompt admitted while other rows run in the same
        target forward as one decode step of those rows (default True; cheaper where a step's few
        tokens leave the matrix products below compute-bound, as on a CPU); False: prefill it alone
        first (a baseline). Outputs do not depend on it. Early exit always prefills alone.
      chunk_steps: on-device steps between host visits (default: all at once, or 16 with stop strings
        or slots).
      method: a method spec, e.g. ``Medusa(tree="tree-16")`` or ``PromptLookup(k=2, budget=3)`` (see
        ``specdec.method_spec`` and each method's page under docs/methods/), or its registered name
        ("autoregressive", the default; "draft", "prompt_lookup", "medusa", "eagle", "early_exit",
        "skipdecode", "superposed") with the method's options as keywords beside it (e.g.
        ``method="draft", k=2``). By-load options (k, draft_width, tree, budget) may be
        ``{running rows: value}`` dicts with a key 1, picked at each chunk's start.
        Superposed decoding returns each prompt's drafts best first in ``drafts``; it takes none of
        temperature, top_k, top_p, stop, slots or chunk_steps. SkipDecode does not take slots.
    Returns:
      a ``Generation`` for a single prompt, else a list in input order.
    """
    spec, general = _split(options)
    if spec.name == "superposed":
        return _superposed(model, prompts, spec, general)
    run = _Run(model, prompts, spec, general)
    start = time.perf_counter()
    ttft = None
    for st, _ in run.states():
        if ttft is None:
            dec_of(st).last.block_until_ready()
            ttft = time.perf_counter() - start
    wall = time.perf_counter() - start
    stats = DecodeStats(ttft_s=ttft, wall_s=wall, new_tokens=sum(len(o[0]) for o in run.outcomes),
                        target_forwards=run.use.forwards, rows=run.n,
                        row_forwards=sum(o[1] for o in run.outcomes),
                        slot_utilisation=run.use.utilisation if general.slots is not None else None,
                        prefill_s=run.use.prefill_s,
                        mean_active_layers=run.schedule.mean_active if run.schedule is not None else None)
    if run.times is not None:
        stats.proposer_s = sum(t.proposer_s for t in run.times)
        stats.target_s = sum(t.target_s for t in run.times)
    results = []
    for r, (raw, forwards, hist) in enumerate(run.outcomes):
        toks, why = run.cut(raw, r)
        results.append(Generation(tokens=toks, text=run.text(toks, r), finish_reason=why,
                                  prompt_tokens=len(run.ids[r]), stats=stats, target_forwards=forwards,
                                  accepted_histogram=hist,
                                  accepted_per_forward=(len(raw) - 1) / forwards if forwards else float("nan")))
    return results[0] if run.single else results


def stream(model, prompts, *, chunk_steps: int = 8, **options) -> Iterator[list[str]]:
    """Like ``generate`` but yields, after each on-device chunk, each row's new text."""
    spec, general = _split(options)
    if spec.name == "superposed":
        raise ValueError("stream does not support method 'superposed' (its drafts are ranked at the end): "
                         "use generate")
    run = _Run(model, prompts, spec, dataclasses.replace(general, chunk_steps=chunk_steps))
    if run.lm.tokenizer is None:
        raise ValueError("stream needs a tokenizer to produce text; use generate with token ids")
    shown = [""] * run.n
    for st, rows in run.states():
        dec = dec_of(st)
        out, n_out = np.asarray(dec.out), np.asarray(dec.n_out)
        raw = [o[0] if o is not None else [] for o in run.outcomes]
        for i, r in enumerate(rows):
            if r is not None:
                raw[r] = out[i, :n_out[i]].tolist()
        texts = [run.text(run.cut(toks, r)[0], r) for r, toks in enumerate(raw)]
        # hold back a trailing replacement char: a multi-byte character may be incomplete
        texts = [t[:-1] if t.endswith("\ufffd") else t for t in texts]
        yield [t[len(s):] for t, s in zip(texts, shown)]
        shown = texts


_NOT_SUPERPOSED = ("temperature", "top_k", "top_p", "stop", "slots", "chunk_steps")


def _superposed(model, prompts, spec, options: GenerateOptions) -> Generation | list[Generation]:
    """``generate(method="superposed")``: k drafts per prompt from one superposed pass."""
    from specdec.ngrams import NgramModel, build_ngram_file, default_ngram_path, load_ngrams, tokenizer_name
    from specdec.superposed import superposed_decode

    given = [o for o in _NOT_SUPERPOSED if getattr(options, o) != getattr(GenerateOptions(), o)]
    if given:
        raise ValueError(f"method 'superposed' does not take {given}: it draws from its own shared distribution "
                         f"(tau, n_token_sample) and decodes every prompt as one batch")
    lm = as_model(model)
    single = _is_single(prompts)
    ids = encode_prompts(lm, [prompts] if single else list(prompts), options.chat, options.system)
    if not ids:
        raise ValueError("no prompts given")
    ngrams, alpha = spec.ngrams, spec.alpha
    if alpha != 0 and not isinstance(ngrams, NgramModel):
        if ngrams is None:
            if lm.tokenizer is None:
                raise ValueError(f"model {lm.name!r} has no tokenizer to build n-grams with: pass ngrams= or alpha=0")
            ngrams = default_ngram_path(lm.name)
            if not ngrams.exists():
                print(f"building the default n-gram tables for {lm.name} at {ngrams} (once)")
                build_ngram_file(lm.tokenizer, ngrams)
        ngrams = load_ngrams(ngrams, vocab_size=lm.config.vocab_size,
                             tokenizer=tokenizer_name(lm.tokenizer) if lm.tokenizer is not None else None)
    eos = set(lm.tokenizer.eos_ids) if lm.tokenizer is not None and not options.ignore_eos else set()
    eos |= set(options.stop_tokens or ())
    if isinstance(options.max_new_tokens, (list, tuple)):
        raise ValueError("method 'superposed' takes one max_new_tokens for all prompts (its drafts advance together)")
    new = int(options.max_new_tokens)
    start = time.perf_counter()
    spec = dataclasses.replace(spec, ngrams=None if alpha == 0 else ngrams)
    per_prompt = superposed_decode(lm.graphdef, lm.state, ids, spec, max_new_tokens=new, eos_ids=tuple(eos),
                                   max_cache_len=options.max_cache_len)
    wall = time.perf_counter() - start
    decode = lm.tokenizer.decode if lm.tokenizer is not None else None
    results = []
    for prompt, found in zip(ids, per_prompt):
        drafts = []
        for toks, score in found:
            ended = bool(toks) and toks[-1] in eos
            toks = toks[:-1] if ended else toks
            drafts.append(Draft(tokens=toks, text=decode(toks) if decode else None, score=score,
                                finish_reason="eos" if ended else "length"))
        results.append(drafts)
    stats = DecodeStats(ttft_s=float("nan"), wall_s=wall, new_tokens=sum(len(d[0].tokens) for d in results if d),
                        target_forwards=new - 1, rows=len(ids), row_forwards=(new - 1) * len(ids))
    out = [Generation(tokens=d[0].tokens, text=d[0].text, finish_reason=d[0].finish_reason, prompt_tokens=len(p),
                      stats=stats, target_forwards=new - 1, drafts=d) for p, d in zip(ids, results)]
    return out[0] if single else out

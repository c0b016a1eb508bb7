"""N-gram count tables (n = 2..6) over token ids, with a lookup that runs inside ``jax.jit``.

Superposed decoding scores each draft's candidate tokens with an interpolated n-gram model
``p_ngram(x | s) = sum_n lambda_n * p_n(x | last n-1 tokens of s)``, ``p_n = count(ctx + x) / count(ctx + *)``.

Storage (per n, all arrays sorted, at least one entry each):

- ``ctx_hi, ctx_lo: [C_n] uint32``, ``ctx_total: [C_n] int32``: the 64-bit hash of each
  context (n-1 tokens followed by a token inside a document) and how often it occurs so.
- ``key_hi, key_lo: [K_n] uint32``, ``key_count: [K_n] int32``: the hash of each n-gram and its count.

A 64-bit hash is held as two uint32 words ``(hi, lo)`` and tables are sorted by ``(hi, lo)``
lexicographically (numpy sorts the packed uint64 at build time). Lookups use a binary search
with lexicographic comparisons of the two words, so jax needs no ``jax_enable_x64``. The hash
is a chain: ``h(t_1..t_m) = step(h(t_1..t_{m-1}), t_m)``, the same uint32 arithmetic in numpy
(build) and jnp (lookup); an n-gram's hash is its context's hash stepped once by the next
token. Two distinct token tuples collide with probability ~2^-64 per pair (ignored).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm.auto import tqdm

FORMAT = "specdec-ngrams"
VERSION = 1
# published interpolation weights (Shen et al. 2024) for n = 2..6
DEFAULT_LAMBDAS = {2: 0.01, 3: 0.04, 4: 0.15, 5: 0.18, 6: 0.12}
_SEEDS = (0x9E3779B9, 0x7F4A7C15)
_TOKEN_MUL = (0x27D4EB2F, 0x165667B1)
_FMIX = (0x85EBCA6B, 0xC2B2AE35)
_TABLES = ("ctx_hi", "ctx_lo", "ctx_total", "key_hi", "key_lo", "key_count")


def _fmix(xp, h):
    h = h ^ (h >> 16)
    h = h * xp.uint32(_FMIX[0])
    h = h ^ (h >> 13)
    h = h * xp.uint32(_FMIX[1])
    return h ^ (h >> 16)


def hash_step(xp, hi, lo, token):
    """Extend hashes ``(hi, lo)`` (uint32 arrays) by ``token`` (int array of the same shape)."""
    t = token.astype(xp.uint32)
    return (_fmix(xp, hi ^ (t * xp.uint32(_TOKEN_MUL[0]))),
            _fmix(xp, lo ^ (t * xp.uint32(_TOKEN_MUL[1]) + xp.uint32(1))))


def hash_tokens(xp, tokens):
    """64-bit hashes ``(hi, lo)`` of ``tokens: [..., m]`` (each row one tuple) in numpy or jnp."""
    shape = tokens.shape[:-1]
    hi = xp.full(shape, _SEEDS[0], xp.uint32)
    lo = xp.full(shape, _SEEDS[1], xp.uint32)
    for j in range(tokens.shape[-1]):
        hi, lo = hash_step(xp, hi, lo, tokens[..., j])
    return hi, lo


@struct.dataclass
class NgramModel:
    """Count tables for ``ns`` (e.g. 2..6), one tuple entry per n; a pytree usable in jit."""

    ctx_hi: tuple
    ctx_lo: tuple
    ctx_total: tuple
    key_hi: tuple
    key_lo: tuple
    key_count: tuple
    ns: tuple = struct.field(pytree_node=False)
    meta: str = struct.field(pytree_node=False, default="{}")  # JSON: tokenizer, vocab_size, corpus, counts

    @property
    def info(self) -> dict:
        return json.loads(self.meta)

    @property
    def context_width(self) -> int:
        """Context tokens a lookup reads: ``max(ns) - 1``."""
        return max(self.ns) - 1


def _lower_bound(hi_arr, lo_arr, q_hi, q_lo):
    """Index of the first ``(hi, lo) >= (q_hi, q_lo)`` in lexicographically sorted tables, and whether it is equal."""
    size = hi_arr.shape[0]

    def body(_, bounds):
        lo_i, hi_i = bounds
        mid = (lo_i + hi_i) // 2
        m = jnp.minimum(mid, size - 1)
        less = (hi_arr[m] < q_hi) | ((hi_arr[m] == q_hi) & (lo_arr[m] < q_lo))
        open_ = lo_i < hi_i
        return jnp.where(open_ & less, mid + 1, lo_i), jnp.where(open_ & ~less, mid, hi_i)

    start = (jnp.zeros(q_hi.shape, jnp.int32), jnp.full(q_hi.shape, size, jnp.int32))
    idx = jax.lax.fori_loop(0, math.ceil(math.log2(size + 1)), body, start)[0]
    at = jnp.minimum(idx, size - 1)
    return at, (idx < size) & (hi_arr[at] == q_hi) & (lo_arr[at] == q_lo)


def ngram_probs(ng: NgramModel, context: jax.Array, context_len: jax.Array, candidates: jax.Array,
                lambdas: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Interpolated n-gram probabilities of candidate next tokens (jit-friendly, static shapes).

    Args:
      ng: the tables.
      context: [..., W] int, the last ``W = ng.context_width`` tokens of each sequence, right-aligned.
      context_len: [...] int, how many of them are real (shorter sequences pad on the left).
      candidates: [..., C] int next tokens to score.
      lambdas: [len(ng.ns)] float weights, one per n in ``ng.ns``.
    Returns:
      p: [..., C] float32 ``sum_n lambda_n * p_n(candidate | last n-1 tokens)``, where an n whose
        context is longer than the sequence or never seen contributes 0;
      supported: [..., C] bool, some n with a seen context has a nonzero count for the candidate.
    """
    width = ng.context_width
    p = jnp.zeros(candidates.shape, jnp.float32)
    supported = jnp.zeros(candidates.shape, bool)
    for i, n in enumerate(ng.ns):
        c_hi, c_lo = hash_tokens(jnp, context[..., width - (n - 1):])
        at, found = _lower_bound(ng.ctx_hi[i], ng.ctx_lo[i], c_hi, c_lo)
        total = jnp.where(found & (context_len >= n - 1), ng.ctx_total[i][at], 0)[..., None]
        k_hi, k_lo = hash_step(jnp, *(jnp.broadcast_to(h[..., None], candidates.shape) for h in (c_hi, c_lo)),
                               candidates)
        at, found = _lower_bound(ng.key_hi[i], ng.key_lo[i], k_hi, k_lo)
        count = jnp.where(found & (total > 0), ng.key_count[i][at], 0)
        p = p + lambdas[i] * count.astype(jnp.float32) / jnp.maximum(total, 1).astype(jnp.float32)
        supported = supported | (count > 0)
    return p, supported


def default_lambdas(ns: Sequence[int]) -> tuple[float, ...]:
    """The published weights for each n in ``ns`` (n = 2..6)."""
    if unknown := [n for n in ns if n not in DEFAULT_LAMBDAS]:
        raise ValueError(f"no published interpolation weight for n = {unknown}; pass lambdas explicitly")
    return tuple(DEFAULT_LAMBDAS[n] for n in ns)


# ----------------------------------------------------------------------------------------- building


def _unique_counts(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    packed = (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)
    keys, counts = np.unique(packed, return_counts=True)
    if keys.size == 0:  # one never-matching row keeps every table non-empty
        keys, counts = np.array([np.iinfo(np.uint64).max], np.uint64), np.zeros(1, np.int64)
    return (keys >> np.uint64(32)).astype(np.uint32), (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), \
        counts.astype(np.int32)


def build_ngrams(documents: Iterable[Sequence[int]], *, vocab_size: int, ns: Sequence[int] = (2, 3, 4, 5, 6),
                 tokenizer: str = "", corpus: str = "", progress: bool = True) -> NgramModel:
    """Count the n-grams of token id ``documents`` (n-grams never cross a document boundary)."""
    ns = tuple(sorted(set(ns)))
    if not ns or ns[0] < 2:
        raise ValueError(f"ns must be orders >= 2, got {ns}")
    docs = [np.asarray(d, np.int64) for d in documents]
    lengths = np.array([len(d) for d in docs], np.int64)
    flat = np.concatenate(docs + [np.zeros(ns[-1], np.int64)]) if docs else np.zeros(ns[-1], np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {flat.min()}..{flat.max()}")
    total = int(lengths.sum())
    doc_end = np.repeat(np.cumsum(lengths), lengths)  # [total] end (exclusive) of each token's document
    starts = np.arange(total)
    hi = np.full(total, _SEEDS[0], np.uint32)
    lo = np.full(total, _SEEDS[1], np.uint32)
    tables = {name: [] for name in _TABLES}
    for m in tqdm(range(1, ns[-1] + 1), desc="counting n-grams", disable=not progress):
        prev_hi, prev_lo = hi, lo  # hashes of the (m-1)-token windows starting at each position
        hi, lo = hash_step(np, hi, lo, flat[starts + m - 1])
        if m in ns:
            inside = starts + m <= doc_end
            for name, arrs in zip(("ctx", "key"), ((prev_hi, prev_lo), (hi, lo))):
                h, low, counts = _unique_counts(arrs[0][inside], arrs[1][inside])
                tables[f"{name}_hi"].append(h)
                tables[f"{name}_lo"].append(low)
                tables[f"{name}_total" if name == "ctx" else "key_count"].append(counts)
    meta = dict(format=FORMAT, version=VERSION, tokenizer=tokenizer, vocab_size=int(vocab_size), ns=list(ns),
                corpus=corpus, documents=len(docs), tokens=total)
    return NgramModel(**{k: tuple(jnp.asarray(a) for a in v) for k, v in tables.items()}, ns=ns,
                      meta=json.dumps(meta, sort_keys=True))


def tokenizer_name(tokenizer) -> str:
    """A short identity of a ``TextTokenizer``: vocabulary size and a digest of its vocabulary."""
    vocab = json.dumps(sorted(tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()))
    return f"vocab{tokenizer.vocab_size}-{hashlib.sha256(vocab.encode()).hexdigest()[:12]}"


def tokenize_texts(texts: Iterable[str], tokenizer, *, progress: bool = True, batch: int = 256) -> Iterator[list[int]]:
    """Token ids of each text with a ``TextTokenizer`` (no special tokens added), in batches."""
    texts = list(texts)
    with tqdm(total=len(texts), desc="tokenizing", unit="doc", disable=not progress) as bar:
        for at in range(0, len(texts), batch):
            chunk = texts[at:at + batch]
            yield from (enc.ids for enc in tokenizer.tokenizer.encode_batch(chunk, add_special_tokens=False))
            bar.update(len(chunk))


def build_ngrams_from_texts(texts: Iterable[str], tokenizer, *, ns: Sequence[int] = (2, 3, 4, 5, 6),
                            corpus: str = "", progress: bool = True) -> NgramModel:
    """Tokenise ``texts`` (one document each) with a ``TextTokenizer`` and count their n-grams."""
    docs = list(tokenize_texts(texts, tokenizer, progress=progress))
    return build_ngrams(docs, vocab_size=tokenizer.vocab_size, ns=ns, tokenizer=tokenizer_name(tokenizer),
                        corpus=corpus, progress=progress)


# ------------------------------------------------------------------------------------------ corpora


def read_text_corpus(path: str | Path) -> list[str]:
    """Documents of a plain text file: blocks separated by one or more blank lines."""
    text = Path(path).read_text(encoding="utf-8")
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    return [b for b in blocks if b]


def _record_texts(record) -> list[str]:
    if isinstance(record, str):
        return [record]
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return [record["text"]]
        turns = record.get("conversations") or record.get("messages") or []
    else:
        turns = record if isinstance(record, list) else []
    return [t.get("value") or t.get("content") or "" for t in turns if isinstance(t, dict)]


def read_jsonl_corpus(path: str | Path) -> list[str]:
    """Documents of a JSON-lines file: per line, its ``"text"`` field, or each turn of a
    conversation (``"conversations"`` with ``value``, or ``"messages"`` with ``content``)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not valid JSON: {e}") from None
            out += [t for t in _record_texts(record) if t.strip()]
    return out


def sharegpt_texts(max_conversations: int | None = None) -> list[str]:
    """Every turn (user and assistant) of the first ``max_conversations`` ShareGPT training conversations."""
    from specdec.datasets import sharegpt

    convs = sharegpt("train")[:max_conversations]
    return [turn["content"] for conv in convs for turn in conv]


def corpus_texts(source: str | Path | None = None, max_documents: int | None = None) -> tuple[list[str], str]:
    """Documents and a description of a corpus: ``None`` or ``"sharegpt"`` (the training split,
    ``max_documents`` conversations), a ``.jsonl`` file, or any other text file (blank-line blocks)."""
    if source is None or str(source) == "sharegpt":
        return sharegpt_texts(max_documents), f"sharegpt train, {max_documents or 'all'} conversations"
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    texts = read_jsonl_corpus(path) if path.suffix in (".jsonl", ".ndjson") else read_text_corpus(path)
    return texts[:max_documents], f"{path.name}, {min(len(texts), max_documents or len(texts))} documents"


def default_ngram_path(model_name: str) -> Path:
    """Where ``build_ngram_file`` writes by default: ``<specdec cache>/ngrams/<model name>.npz``."""
    from specdec.fetch import cache_dir

    return cache_dir() / "ngrams" / f"{Path(str(model_name)).name}.npz"


def build_ngram_file(tokenizer, out: str | Path, *, source: str | Path | None = None,
                     max_documents: int | None = 5_000, ns: Sequence[int] = (2, 3, 4, 5, 6),
                     progress: bool = True) -> NgramModel:
    """Corpus -> tokens -> counts -> ``out`` (.npz), in one call (what ``specdec build-ngrams`` runs).

    source: ``None``/``"sharegpt"`` (training split; ``max_documents`` conversations), a ``.jsonl``
    file or a text file (``max_documents`` documents; None = all).
    """
    texts, description = corpus_texts(source, max_documents)
    ng = build_ngrams_from_texts(texts, tokenizer, ns=ns, corpus=description, progress=progress)
    save_ngrams(ng, out)
    return ng


# -------------------------------------------------------------------------------------- save / load


def save_ngrams(ng: NgramModel, path: str | Path) -> Path:
    """Write ``ng`` to one ``.npz`` file (uncompressed: loading is a plain read)."""
    path = Path(path)
    arrays = {f"{name}_{n}": np.asarray(getattr(ng, name)[i]) for name in _TABLES for i, n in enumerate(ng.ns)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, meta=np.array(ng.meta), **arrays)
    return path


def load_ngrams(path: str | Path, *, vocab_size: int | None = None, tokenizer: str | None = None) -> NgramModel:
    """Read a file written by :func:`save_ngrams`, checking it fits a vocabulary / tokenizer name.

    Raises FileNotFoundError when it is missing and ValueError when it is not such a file or was
    built for another vocabulary size or tokenizer (see :func:`tokenizer_name`).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"n-gram file {path} does not exist: build it with build_ngrams / "
                                f"`specdec build-ngrams`")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise ValueError(f"format {meta.get('format')!r} v{meta.get('version')}")
            ns = tuple(meta["ns"])
            tables = {name: tuple(jnp.asarray(data[f"{name}_{n}"]) for n in ns) for name in _TABLES}
    except Exception as e:  # zip, npz key, JSON and format errors alike
        raise ValueError(f"{path} is not a valid specdec n-gram file ({type(e).__name__}: {e})") from None
    if vocab_size is not None and meta["vocab_size"] != vocab_size:
        raise ValueError(f"{path} was built for a vocabulary of {meta['vocab_size']} tokens, "
                         f"but the model has {vocab_size}: rebuild it with this model's tokenizer")
    if tokenizer and meta.get("tokenizer") and meta["tokenizer"] != tokenizer:
        raise ValueError(f"{path} was built with tokenizer {meta['tokenizer']}, not {tokenizer}: "
                         f"rebuild it with this model's tokenizer")
    return NgramModel(**tables, ns=ns, meta=json.dumps(meta, sort_keys=True))


# -------------------------------------------------------------------------------- reference (tests)


@dataclass
class NgramReference:
    """Plain-dict n-gram counts, the slow reference for :func:`ngram_probs`."""

    ns: tuple[int, ...] = (2, 3, 4, 5, 6)
    counts: dict = field(default_factory=dict)  # (n, context tuple) -> {next token: count}

    def add(self, doc: Sequence[int]) -> None:
        doc = list(doc)
        for n in self.ns:
            for i in range(len(doc) - n + 1):
                nxt = self.counts.setdefault((n, tuple(doc[i:i + n - 1])), {})
                nxt[doc[i + n - 1]] = nxt.get(doc[i + n - 1], 0) + 1

    def prob(self, seq: Sequence[int], token: int, lambdas: Sequence[float]) -> tuple[float, bool]:
        """``(sum_n lambda_n p_n(token | seq[-(n-1):]), supported)`` for the sequence ``seq``."""
        p, supported = 0.0, False
        for n, lam in zip(self.ns, lambdas):
            if len(seq) < n - 1:
                continue
            nxt = self.counts.get((n, tuple(seq[len(seq) - n + 1:])), {})
            if nxt.get(token, 0):
                p += lam * nxt[token] / sum(nxt.values())
                supported = True
        return p, supported

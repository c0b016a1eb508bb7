"""Medusa heads: n small residual heads that guess the tokens 2, 3, ... steps ahead.

Head ``k`` (0-based) reads the backbone's final-normed hidden state at position
``t`` (the one the LM head turns into token ``t + 1``) and predicts token
``t + 2 + k``. Each head is ``n_layers`` residual blocks ``x + SiLU(W x + b)``
with ``W`` and ``b`` zero-initialised (the identity at start, independent
weights per block), then either its own vocabulary projection initialised from
the base LM head or the base LM head itself (``shared_lm_head``; far cheaper
for small models).
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drafts.model import frequent_vocab
from specdec.config import DTYPES
from specdec.engine import whole_number
from specdec.model import Llama, fingerprint, head_table
from specdec.saved import read_config, restore_params, save_dir

CONFIG_FILE = "medusa_config.json"
TOKEN_COUNTS_FILE = "token_counts.npy"  # [vocab] int64: how often each token was head 0's training label


@dataclass(frozen=True, kw_only=True)
class MedusaConfig:
    """Shape of a set of Medusa heads and the base model they were made for."""

    d_model: int
    vocab_size: int
    n_heads: int = 4
    n_layers: int = 1
    shared_lm_head: bool = True
    dtype: str = "float32"
    base_model: str = ""  # the base model's name, for messages
    base_fingerprint: str = ""  # :func:`base_fingerprint` of the base model

    def __post_init__(self) -> None:
        if self.n_heads < 1 or self.n_layers < 1:
            raise ValueError(f"n_heads and n_layers must be >= 1, got {self.n_heads} and {self.n_layers}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]


class ResBlock(nnx.Module):
    """``x + SiLU(W x + b)`` with W and b zero-initialised."""

    def __init__(self, d: int, dtype):
        self.linear = nnx.Linear(d, d, dtype=dtype, param_dtype=dtype, kernel_init=nnx.initializers.zeros,
                                 bias_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.nn.silu(self.linear(x))


class MedusaHeads(nnx.Module):
    def __init__(self, cfg: MedusaConfig, base: Llama | None = None):
        """Fresh heads; ``base`` (needed unless ``shared_lm_head``) initialises their LM heads."""
        self.config = cfg
        dt = cfg.jnp_dtype
        self.blocks = nnx.List([nnx.List([ResBlock(cfg.d_model, dt) for _ in range(cfg.n_layers)])
                                for _ in range(cfg.n_heads)])
        self.lm_heads = nnx.data(None)
        if not cfg.shared_lm_head:
            if base is None:
                raise ValueError("heads with their own LM heads are initialised from the base model: pass base=")
            table = head_table(base).astype(dt)
            self.lm_heads = nnx.data([nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dt,
                                                 param_dtype=dt, kernel_init=lambda *_: table.T, rngs=nnx.Rngs(0))
                                      for _ in range(cfg.n_heads)])

    def features(self, hidden: jax.Array, n: int | None = None) -> jax.Array:
        """``hidden: [..., d]`` (final-normed backbone state) -> ``[..., n, d]`` for the first ``n``
        heads (default: all)."""
        x = hidden.astype(self.config.jnp_dtype)
        outs = []
        for blocks in self.blocks[:n]:
            h = x
            for block in blocks:
                h = block(h)
            outs.append(h)
        return jnp.stack(outs, axis=-2)

    def logits(self, hidden: jax.Array, base_table: jax.Array | None, n: int | None = None) -> jax.Array:
        """``hidden: [..., d]`` -> float32 logits ``[..., n, vocab]`` of the first ``n`` heads (default: all;
        a tree ``D`` deep needs only ``D``, and each head's vocabulary projection is most of its cost).

        base_table: the base LM head ``[vocab, d]`` (:func:`head_table`), used when shared; that
        projection runs in the table's dtype, as the base model's own LM head does (bfloat16 heads
        on a float32 base: the features are cast up, the table is not cast down at every call).
        """
        f = self.features(hidden, n)
        if self.lm_heads is None:
            if base_table is None:
                raise ValueError("these heads share the base LM head: pass base_table=head_table(model)")
            out = jax.lax.dot_general(f.astype(base_table.dtype), base_table, (((f.ndim - 1,), (1,)), ((), ())))
        else:
            out = jnp.stack([head(f[..., i, :]) for i, head in enumerate(self.lm_heads)], axis=-2)
        return out.astype(jnp.float32)


def new_heads(base: Llama, *, base_name: str, n_heads: int = 4, n_layers: int = 1, shared_lm_head: bool = True,
              dtype: str = "float32") -> MedusaHeads:
    """Fresh (identity-initialised) heads for ``base``."""
    cfg = MedusaConfig(d_model=base.config.d_model, vocab_size=base.config.vocab_size, n_heads=n_heads,
                       n_layers=n_layers, shared_lm_head=shared_lm_head, dtype=dtype, base_model=base_name,
                       base_fingerprint=fingerprint(base))
    return MedusaHeads(cfg, base)


def save_heads(heads: MedusaHeads, path: str | Path, extra: dict | None = None,
               token_counts: np.ndarray | None = None) -> Path:
    """Write ``heads`` to the directory ``path``: orbax parameters + ``medusa_config.json``.

    extra: more JSON-able metadata to record (e.g. training metrics, per-head accuracies).
    token_counts: ``[vocab]`` how often each token was a training label, saved as ``token_counts.npy``
    for :func:`head_vocabulary`.
    """
    out = save_dir(path, nnx.to_pure_dict(nnx.state(heads, nnx.Param)), CONFIG_FILE,
                   {"config": asdict(heads.config), **(extra or {})})
    if token_counts is not None:
        if np.shape(token_counts) != (heads.config.vocab_size,):
            raise ValueError(f"token_counts must have shape ({heads.config.vocab_size},), got {np.shape(token_counts)}")
        np.save(out / TOKEN_COUNTS_FILE, np.asarray(token_counts, np.int64))
    return out


def head_vocabulary(heads_dir: str | Path | None, size: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """``[size]`` int32, sorted: the ``size`` tokens the heads at ``heads_dir`` were most often trained to
    predict (``always`` included, e.g. EOS), from their ``token_counts.npy``."""
    counts = None if heads_dir is None else Path(heads_dir) / TOKEN_COUNTS_FILE
    if counts is None or not counts.is_file():
        where = "heads not loaded from a directory" if heads_dir is None else f"no {TOKEN_COUNTS_FILE} in {heads_dir}"
        raise ValueError(f"head_vocab={size} picks the tokens the heads were most often trained on, but there are "
                         f"no training counts ({where}): re-train them with `specdec train-heads` (which saves "
                         "them) or pass head_vocab as a list of token ids")
    return frequent_vocab(np.load(counts), size, always)


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata saved with heads at ``path`` (``config`` plus any extra entries)."""
    return read_config(path, CONFIG_FILE, what="Medusa heads", fix="re-save or re-train the heads (save_heads)")


def load_heads(path: str | Path, base: Llama) -> MedusaHeads:
    """Heads saved at ``path``, checked against the base model they will run on."""
    path = Path(path).resolve()
    meta = read_metadata(path)
    cfg = MedusaConfig(**meta["config"])
    if cfg.base_fingerprint != fingerprint(base) or cfg.vocab_size != base.config.vocab_size:
        raise ValueError(f"the Medusa heads at {path} were trained for base model {cfg.base_model!r} "
                         f"(fingerprint {cfg.base_fingerprint}), not for this model (fingerprint "
                         f"{fingerprint(base)}): load heads trained for this model or train new ones "
                         f"with `specdec train-heads`")
    heads = MedusaHeads(cfg, base)
    state = nnx.state(heads, nnx.Param)
    restored = restore_params(path, nnx.to_pure_dict(state), "Medusa head")
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(heads, state)
    return heads


def checked_vocab(vocab, cfg) -> jax.Array:
    """``vocab`` as ``[N]`` int32 after checking it suits heads of config ``cfg``."""
    if not cfg.shared_lm_head:
        raise ValueError("head_vocab needs heads that share the base LM head (shared_lm_head=True); these heads "
                         "have their own vocabulary projections: drop head_vocab")
    ids = np.asarray(vocab)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"head_vocab must be a non-empty list of token ids, got an array of shape {ids.shape} "
                         f"and dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size or len(np.unique(ids)) != ids.size:
        raise ValueError(f"head_vocab must hold distinct token ids in [0, {cfg.vocab_size}), got "
                         f"{ids.size} ids in [{ids.min()}, {ids.max()}] ({ids.size - len(np.unique(ids))} repeated)")
    return jnp.asarray(ids, jnp.int32)


def head_vocab_ids(target, value, heads_dir: str | Path | None):
    """The ``head_vocab`` option for heads at ``heads_dir`` on ``target`` (a ``LoadedModel``) as token ids
    (None: every token): a count N picks :func:`head_vocabulary` (the target's EOS ids kept; 0: every
    token), a sequence is taken as the ids (checked when the proposer is built)."""
    if value is None or not isinstance(value, numbers.Real):
        return value
    size = whole_number(value, "head_vocab (tokens the Medusa heads may propose; 0: every token)", 0,
                        target.config.vocab_size)
    if size == 0:
        return None
    eos = tuple(target.tokenizer.eos_ids) if target.tokenizer is not None else ()
    return head_vocabulary(heads_dir, size, eos)

"""``specdec.load``: a registry name, a .gguf file or a Hugging Face directory -> model + tokenizer."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from specdec.config import LlamaConfig, precision_name, precision_policy
from specdec.fetch import MODELS, model_file
from specdec.model import Llama
from specdec.tokenizer import TextTokenizer


@dataclass
class LoadedModel:
    """A model split once into (graphdef, state) for jitted pure functions, plus its tokenizer."""

    name: str
    config: LlamaConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    tokenizer: TextTokenizer | None

    @classmethod
    def from_module(cls, model: Llama, tokenizer: TextTokenizer | None = None, name: str = "custom"):
        graphdef, state = nnx.split(model)
        return cls(name=name, config=model.config, graphdef=graphdef, state=state, tokenizer=tokenizer)

    @property
    def module(self) -> Llama:
        """The model as a module. It shares this state's variables and arrays: use
        :meth:`copy_module` for a module to train or update."""
        return nnx.merge(self.graphdef, self.state)

    def copy_module(self) -> Llama:
        """The model as a module with its own copy of the parameters (safe to train, donate or update)."""
        return nnx.merge(self.graphdef, jax.tree.map(jnp.copy, self.state))


def load(name_or_path: str | Path, *, precision: str | None = None) -> LoadedModel:
    """Load a model by registry name (e.g. ``"smollm2-135m"``), GGUF path or HF directory.

    precision: the precision policy (:data:`specdec.config.PRECISION_POLICIES`): "highest" (float32,
    full-float32 products; the CPU default), "default" (float32, the backend's product precision:
    TF32 on NVIDIA GPUs) or "bf16" (bfloat16 parameters and activations, float32 accumulation; the
    GPU/TPU default). None picks the backend's default.
    """
    from specdec.gguf_loader import gguf_config, gguf_tensors, open_gguf
    from specdec.hf_checkpoint import hf_config, read_hf_dir
    from specdec.tokenizer import tokenizer_from_gguf, tokenizer_from_hf_dir
    from specdec.weights import model_from_hf

    policy = precision_policy(precision)
    name = str(name_or_path)
    path = model_file(name) if name in MODELS else Path(name).expanduser()
    if name not in MODELS and not path.exists():
        raise ValueError(f"unknown model {name!r}: not a registry name ({', '.join(sorted(MODELS))}) "
                         f"and no such file or directory")
    if path.is_dir():
        raw, tensors = read_hf_dir(path)
        cfg = hf_config(raw, **policy)
        tokenizer = tokenizer_from_hf_dir(path, raw.get("eos_token_id")) if (path / "tokenizer.json").exists() else None
    else:
        reader = open_gguf(path)
        cfg = gguf_config(reader, **policy)
        tensors = gguf_tensors(reader, cfg)
        tokenizer = tokenizer_from_gguf(reader)
    return LoadedModel.from_module(model_from_hf(cfg, tensors.__getitem__), tokenizer, name)


def as_model(model: LoadedModel | str | Path) -> LoadedModel:
    """``model`` itself, or the model a registry name or path names (:func:`load_once`)."""
    return model if isinstance(model, LoadedModel) else load_once(model)


def load_once(name_or_path: str | Path, *, precision: str | None = None) -> LoadedModel:
    """``load``, memoised in this process per name or path and precision policy. A registry name loads once (its
    download was verified then); a path loads again once its file, or a file of its directory, has a
    new modification time. The arrays are immutable: train or update a
    :meth:`LoadedModel.copy_module`, never the :attr:`~LoadedModel.module` view."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in MODELS or not path.exists():  # a missing path fails in ``load``, with its message
        stamp = None
    elif path.is_dir():
        stamp = tuple(sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir()))
    else:
        stamp = path.stat().st_mtime_ns
    return _load_stamped(name, precision_name(precision_policy(precision)), stamp)


@functools.lru_cache(maxsize=4)
def _load_stamped(name: str, precision: str, stamp) -> LoadedModel:
    return load(name, precision=precision)

"""specdec: speculative and parallel decoding of LLMs in JAX/Flax.

    import specdec
    model = specdec.load("smollm2-135m")
    print(specdec.generate(model, "Write a haiku about JAX.").text)
"""

from specdec.compile_cache import use_compile_cache
from specdec.config import LlamaConfig
from specdec.loading import LoadedModel, load
from specdec.sampling import Sampling

_API = ("DecodeStats", "Generation", "generate", "stream")  # the API layer (specdec.api) imports every method,
# whose modules import the core: it loads on first use, so importing a method's module first needs no cycle

__all__ = ["DecodeStats", "Generation", "LlamaConfig", "LoadedModel", "Sampling", "generate", "load", "stream",
           "use_compile_cache"]


def __getattr__(name: str):
    if name in _API:
        from specdec import api

        return getattr(api, name)
    raise AttributeError(f"module 'specdec' has no attribute {name!r}")

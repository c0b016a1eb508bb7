"""specdec: speculative and parallel decoding of LLMs in JAX/Flax.

    import specdec
    model = specdec.load("smollm2-135m")
    print(specdec.generate(model, "Write a haiku about JAX.").text)
"""

from specdec.api import DecodeStats, Generation, generate, stream
from specdec.compile_cache import use_compile_cache
from specdec.config import LlamaConfig
from specdec.loading import LoadedModel, load
from specdec.sampling import Sampling

__all__ = ["DecodeStats", "Generation", "LlamaConfig", "LoadedModel", "Sampling", "generate", "load", "stream",
           "use_compile_cache"]

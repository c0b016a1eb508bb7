"""Every decoding method, registered: the API layer's one place that loads the methods.

Importing this module imports each method's module, whose spec registers itself
(:func:`specdec.method_spec.register`), and names the specs for users:
``from specdec.methods import Medusa``. A method added outside the package registers the same way
when its module is imported. ``build_proposer`` maps the API's ``method=`` and options to a proposer.
"""

from __future__ import annotations

from typing import Any

from drafts.draft_model import Draft
from drafts.early_exit import EarlyExit
from drafts.prompt_lookup import PromptLookup
from heads.eagle import Eagle
from heads.proposer import Medusa
from specdec.method_spec import Autoregressive, MethodSpec, method_spec
from specdec.skipdecode import SkipDecode
from specdec.superposed import Superposed

__all__ = ["Autoregressive", "PromptLookup", "Draft", "EarlyExit", "Medusa", "Eagle", "SkipDecode", "Superposed",
           "MethodSpec", "build_proposer"]


def build_proposer(method: str | MethodSpec, target, options: dict | None = None) -> tuple[Any, Any] | None:
    """``(proposer, params)`` for ``method`` (a spec, or a name with its ``options``), or None for a
    method that runs its own loop (autoregressive decoding, SkipDecode, superposed decoding).

    Raises ValueError for an unknown method or an option the method does not take.
    """
    return method_spec(method, options).build(target)

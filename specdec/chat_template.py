"""Chat templates: the Jinja template a model ships, rendered the way Hugging Face transformers renders it.

The environment is jinja2's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a ``tojson`` filter that leaves non-ASCII text and HTML characters
as they are, and the globals ``raise_exception(message)`` and ``strftime_now(format)``. A template
sees ``messages``, ``add_generation_prompt`` and the model's ``bos_token`` and ``eos_token``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# For models whose files carry no template but whose vocabulary has the ChatML tokens.
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that refused to render the messages given."""


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _environment()


def conversation(messages: str | Sequence[dict], system: str | None = None) -> list[dict]:
    """Messages as a template takes them: a prompt string becomes one user message, and ``system``
    (if given) a system message in front."""
    messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    if system is None:
        return messages
    if messages and messages[0]["role"] == "system":
        raise ValueError("system= was given but the messages already start with a system message")
    return [{"role": "system", "content": system}, *messages]


@dataclass(frozen=True)
class ChatTemplate:
    """A model's Jinja chat template; ``origin`` says where it came from (for error messages)."""

    source: str
    origin: str
    bos_token: str | None = None
    eos_token: str | None = None

    @cached_property
    def _compiled(self) -> jinja2.Template:
        try:
            return _ENV.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template in {self.origin} is not valid Jinja: {e.message} "
                                    f"(template line {e.lineno})") from e

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The text of ``messages`` ({role, content} dicts), opening the reply if ``add_generation_prompt``."""
        tokens = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None}
        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **tokens)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template in {self.origin} failed on these messages: {e}") from e

"""Chat data for training: chat-template rendering with an assistant-token mask, self-distillation, packing.

An :class:`Example` is token ids plus a 0/1 mask that marks the tokens a loss
may be taken on (the assistant's replies, each up to and including the token that
ends it, e.g. ``<|im_end|>``). Examples are packed into fixed-length rows; each row
keeps segment ids so that attention and targets never cross from one conversation
into the next.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

from specdec.chat_template import conversation
from specdec.tokenizer import TextTokenizer


class Example(NamedTuple):
    tokens: list[int]
    mask: list[int]  # 1 on assistant tokens (loss), 0 elsewhere


class Packed(NamedTuple):
    tokens: np.ndarray  # [R, L] int32 (0 in padding)
    segments: np.ndarray  # [R, L] int32: 1, 2, ... per example in the row; 0 = padding
    positions: np.ndarray  # [R, L] int32 position inside the example
    mask: np.ndarray  # [R, L] bool: assistant tokens


def _grown(before: str, after: str, what: str) -> str:
    """The text ``after`` adds to ``before``; a clear error if it does not start with it."""
    if not after.startswith(before):
        raise ValueError(f"render_chat needs a chat template that renders a conversation as a growing prefix, "
                         f"but {what} rewrites the text before it, so the replies cannot be told apart")
    return after[len(before):]


def render_chat(tok: TextTokenizer, turns: Sequence[dict], system: str | None = None) -> Example:
    """Render ``turns`` (``{role, content}``) with the model's chat template, masking every assistant
    reply up to and including its last end token (one of ``tok.eos_ids``, e.g. ``<|im_end|>``).

    A reply is the text its turn adds to the conversation before it rendered with the generation
    prompt; the pieces between replies are tokenised apart from them. ``system``, if given, goes first.
    """
    messages = conversation(turns, system)
    pieces: list[tuple[str, bool]] = []  # (text, is a reply)
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        asked = tok.render(messages[:k], add_generation_prompt=True)
        answered = tok.render(messages[:k + 1], add_generation_prompt=False)
        pieces += [(_grown(done, asked, f"the generation prompt before turn {k}"), False),
                   (_grown(asked, answered, f"assistant turn {k}"), True)]
        done = answered
    pieces.append((_grown(done, tok.render(messages, add_generation_prompt=False), "the last turns"), False))
    tokens: list[int] = []
    mask: list[int] = []
    for text, reply in pieces:
        ids = tok.encode(text)
        learn = 0
        if reply:
            ends = [i + 1 for i, t in enumerate(ids) if t in tok.eos_ids]
            learn = ends[-1] if ends else len(ids)
        tokens += ids
        mask += [1] * learn + [0] * (len(ids) - learn)
    with_bos = tok.with_bos(tokens)
    return Example(with_bos, [0] * (len(with_bos) - len(tokens)) + mask)


def reply_end(tok: TextTokenizer) -> list[int]:
    """The tokens the chat template closes an assistant reply with, as :func:`render_chat` learns them
    (e.g. ``<|im_end|>``): what an empty reply is masked as."""
    ex = render_chat(tok, [{"role": "user", "content": "?"}, {"role": "assistant", "content": ""}])
    return [t for t, m in zip(ex.tokens, ex.mask) if m]


def self_distill(lm, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int, max_prompt_tokens: int,
                 batch_size: int, temperature: float = 0.0, seed: int = 0) -> list[Example]:
    """Replace each conversation's first reply by the model's own, generated through a request
    pool of ``batch_size`` slots.

    The prompt is the first user turn through the chat template (conversations whose prompt has
    more than ``max_prompt_tokens`` tokens are skipped); the reply is what ``lm`` generates, closed
    as the template closes a reply (:func:`reply_end`) when it ended on an EOS token. Prompts go in
    by length.
    """
    from specdec.api import generate

    tok = lm.tokenizer
    end = reply_end(tok)
    prompts = [tok.encode_prompt(c[0]["content"]) for c in conversations]
    order = sorted((i for i, p in enumerate(prompts) if len(p) <= max_prompt_tokens), key=lambda i: len(prompts[i]))
    out: dict[int, Example] = {}
    block = batch_size * 8  # requests per request-pool run (progress is shown per block)
    for start in tqdm(range(0, len(order), block), desc=f"self-distillation (generate replies, {block} per block)",
                      unit="block"):
        rows = order[start:start + block]
        gens = generate(lm, [prompts[i] for i in rows], max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=[seed + i for i in rows], slots=batch_size)
        for i, g in zip(rows, gens):
            reply = g.tokens + (end if g.finish_reason == "eos" else [])
            out[i] = Example(prompts[i] + reply, [0] * len(prompts[i]) + [1] * len(reply))
    return [out[i] for i in sorted(out)]


def pack(examples: Sequence[Example], length: int) -> Packed:
    """Pack examples (each cut to ``length`` tokens) into rows of ``length``, in order, first fit."""
    if length < 2:
        raise ValueError(f"pack length must be >= 2, got {length}")
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in examples:
        ex = Example(ex.tokens[:length], ex.mask[:length])
        if not any(ex.mask):
            continue
        slot = next((r for r, free in enumerate(room) if free >= len(ex.tokens)), None)
        if slot is None:
            rows.append([])
            room.append(length)
            slot = len(rows) - 1
        rows[slot].append(ex)
        room[slot] -= len(ex.tokens)
    packed = Packed(*(np.zeros((len(rows), length), dt) for dt in (np.int32, np.int32, np.int32, bool)))
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row, start=1):
            n = len(ex.tokens)
            packed.tokens[r, at:at + n] = ex.tokens
            packed.segments[r, at:at + n] = s
            packed.positions[r, at:at + n] = np.arange(n)
            packed.mask[r, at:at + n] = np.asarray(ex.mask, bool)
            at += n
    return packed


def ahead_labels(packed: Packed, aheads) -> np.ndarray:
    """``[R, L, len(aheads)]`` int32: column j at position t is token ``t + aheads[j]``, or -1 where
    that token is past the row, in another example, padding, or not an assistant token."""
    r, length = packed.tokens.shape
    labels = np.full((r, length, len(aheads)), -1, np.int32)
    for j, ahead in enumerate(aheads):
        if ahead >= length:
            break
        same = (packed.segments[:, ahead:] == packed.segments[:, :-ahead]) & (packed.segments[:, ahead:] > 0)
        ok = same & packed.mask[:, ahead:]
        labels[:, :-ahead, j] = np.where(ok, packed.tokens[:, ahead:], -1)
    return labels


def head_labels(packed: Packed, n_heads: int) -> np.ndarray:
    """``[R, L, n_heads]`` Medusa targets: head k at position t learns token ``t + 2 + k``."""
    return ahead_labels(packed, range(2, 2 + n_heads))


def next_labels(packed: Packed) -> np.ndarray:
    """``[R, L]`` next-token targets (token ``t + 1``, -1 where there is none)."""
    return ahead_labels(packed, [1])[..., 0]


def split_examples(lm, cfg, split: str, data: str | None = None) -> list[Example]:
    """The chat examples of ShareGPT's ``split`` ("train" or "heldout") a training config asks for:
    ``cfg.conversations`` (or ``cfg.heldout_conversations``) conversations, with the dataset's
    replies (``data`` or else ``cfg.data`` is "sharegpt") or ``lm``'s own ("self-distill", see
    :func:`self_distill`)."""
    from specdec.datasets import sharegpt

    count = cfg.conversations if split == "train" else cfg.heldout_conversations
    convs = sharegpt(split)[:count]
    if len(convs) < count:
        raise ValueError(f"ShareGPT's {split} split has {len(convs)} conversations, fewer than the {count} asked for")
    if (data or cfg.data) == "self-distill":
        return self_distill(lm, convs, max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=cfg.max_prompt_tokens,
                            batch_size=cfg.gen_batch, seed=cfg.seed)
    return [render_chat(lm.tokenizer, c) for c in tqdm(convs, desc=f"tokenise {split}", unit="conv")]

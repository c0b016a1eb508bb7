"""Chat data for training: ChatML rendering with an assistant-token mask, self-distillation, packing.

An :class:`Example` is token ids plus a 0/1 mask that marks the tokens a loss
may be taken on (the assistant's replies, each with its closing ``<|im_end|>``).
Examples are packed into fixed-length rows; each row keeps segment ids so that
attention and targets never cross from one conversation into the next.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

from specdec.tokenizer import TextTokenizer


class Example(NamedTuple):
    tokens: list[int]
    mask: list[int]  # 1 on assistant tokens (loss), 0 elsewhere


class Packed(NamedTuple):
    tokens: np.ndarray  # [R, L] int32 (0 in padding)
    segments: np.ndarray  # [R, L] int32: 1, 2, ... per example in the row; 0 = padding
    positions: np.ndarray  # [R, L] int32 position inside the example
    mask: np.ndarray  # [R, L] bool: assistant tokens


def render_chat(tok: TextTokenizer, turns: Sequence[dict], system: str | None = None) -> Example:
    """ChatML-render ``turns`` (``{role, content}``), masking every assistant reply and its end token."""
    if not tok.chatml:
        raise ValueError("render_chat needs a model with a ChatML chat template")
    system = system if system is not None else tok.default_system
    if system is not None and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system}, *turns]
    tokens: list[int] = []
    mask: list[int] = []
    for turn in turns:
        head = tok.encode(f"<|im_start|>{turn['role']}\n")
        body = tok.encode(f"{turn['content']}<|im_end|>")
        tail = tok.encode("\n")
        learn = int(turn["role"] == "assistant")
        tokens += head + body + tail
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(tail)
    return Example(tokens, mask)


def self_distill(lm, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int, max_prompt_tokens: int,
                 batch_size: int, temperature: float = 0.0, seed: int = 0) -> list[Example]:
    """Replace each conversation's first reply by the model's own, generated through a request
    pool of ``batch_size`` slots.

    The prompt is the system prompt and first user turn (conversations whose prompt has more
    than ``max_prompt_tokens`` tokens are skipped); the reply is what ``lm`` generates, with
    the ``<|im_end|>`` it ended on. Prompts go in by length.
    """
    from specdec.api import generate

    tok = lm.tokenizer
    end = tok.encode("<|im_end|>")
    prompts = [tok.encode(tok.chat(c[0]["content"])) for c in conversations]
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

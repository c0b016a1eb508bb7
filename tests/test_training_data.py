"""The chat data pipeline: assistant masks, packing, Medusa targets, segment-masked hidden states."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from specdec.model import teacher_forced_logits
from training.data import Example, head_labels, pack, render_chat
from training.features import packed_hidden, segment_mask


def test_pack_keeps_examples_apart():
    exs = [Example([1, 2, 3], [0, 1, 1]), Example([4, 5, 6, 7, 8], [0, 0, 1, 1, 1]), Example([9, 9], [0, 1]),
           Example([7] * 4, [0] * 4)]  # nothing to learn: dropped
    p = pack(exs, 6)
    assert p.tokens.tolist() == [[1, 2, 3, 9, 9, 0], [4, 5, 6, 7, 8, 0]]
    assert p.segments.tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0]]
    assert p.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]]
    assert p.mask.astype(int).tolist() == [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 1, 0]]
    assert pack([Example(list(range(10)), [1] * 10)], 4).tokens.tolist() == [[0, 1, 2, 3]]  # cut to length


def test_head_labels_stay_inside_an_example():
    p = pack([Example([10, 11, 12, 13, 14], [0, 0, 1, 1, 1]), Example([20, 21, 22], [0, 1, 1])], 8)
    labels = head_labels(p, 2)
    # head 0 at t learns token t + 2, head 1 token t + 3; -1 across examples, padding or non-assistant targets
    assert labels[0, :, 0].tolist() == [12, 13, 14, -1, -1, 22, -1, -1]
    assert labels[0, :, 1].tolist() == [13, 14, -1, -1, -1, -1, -1, -1]


def test_segment_masked_hidden_equals_each_example_alone(tiny_lm):
    p = pack([Example([5, 6, 7], [1, 1, 1]), Example([8, 9, 10, 11], [1, 1, 1, 1])], 8)
    h = packed_hidden(tiny_lm.graphdef, tiny_lm.state, jnp.asarray(p.tokens), jnp.asarray(p.segments),
                      jnp.asarray(p.positions))
    model = tiny_lm.module
    for seq, cols in (([5, 6, 7], slice(0, 3)), ([8, 9, 10, 11], slice(3, 7))):
        alone = teacher_forced_logits(model, jnp.asarray([seq]))
        np.testing.assert_allclose(model.logits(h[:, cols]), alone, atol=1e-4)
    assert not bool(segment_mask(jnp.asarray(p.segments))[0, 3, 2])


@pytest.mark.real
def test_chatml_mask_covers_replies_only(smollm2):
    tok = smollm2.tokenizer
    turns = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "Count to 3"}, {"role": "assistant", "content": "1, 2, 3"}]
    ex = render_chat(tok, turns)
    rendered = tok.chat(turns).removesuffix("<|im_start|>assistant\n")  # the template, minus the open reply
    assert tok.decode(ex.tokens, skip_special=False) == rendered
    learned = tok.decode([t for t, m in zip(ex.tokens, ex.mask) if m], skip_special=False)
    assert learned == "Hello! How can I help?<|im_end|>1, 2, 3<|im_end|>"


@pytest.mark.real
def test_sharegpt_splits():
    from specdec.datasets import is_heldout, sharegpt, sharegpt_prompts

    train, held = sharegpt("train"), sharegpt("heldout")
    assert len(train) > 10000 and 100 < len(held) < len(train) // 20
    assert all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in train[:500] + held)
    assert len(sharegpt_prompts(50)) == 50
    assert [is_heldout(f"id{i}") for i in range(1000)].count(True) in range(5, 40)  # ~2%

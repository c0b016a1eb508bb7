"""Medusa heads training: losses, vocabularies, soft targets, resuming, rank replays and the trees built from them."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specdec
from heads.medusa import load_heads, new_heads, save_heads
from heads.tree_search import top1_top5
from specdec.model import head_table
from specdec.config import tiny_config
from specdec.model import init_model
from conftest import greedy_rows, random_heads
from specdec.loading import LoadedModel
from training.data import Example, head_labels, pack
from training.feature_draft import target_rows
from training.features import Features, SoftTargets, backbone_features
from training.medusa import (HeadsTrainConfig, evaluate, fit, heads_reply_ranks, heldout_accuracy, label_counts,
                             medusa_loss, prepare_features, prepare_soft, reply_runs, rows_features, training_vocab)
from training.rank_trees import replay_counts, write_heads_trees


def _features(n: int, seed: int) -> Features:
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, 32)).astype(np.float32)
    labels = (np.abs(hidden[:, :4]) * 20).astype(np.int32) % 97  # learnable from the input
    labels[::5, 3] = -1
    return Features(hidden, labels)


def test_training_lowers_loss_and_resumes_exactly(tiny, tmp_path):
    data, table = _features(512, 0), head_table(tiny)
    cfg = HeadsTrainConfig(batch_size=64, epochs=2, lr=1e-2, checkpoint_every=5)
    heads = new_heads(tiny, base_name="tiny")
    before = evaluate(heads, table, data)
    whole = fit(heads, table, data, cfg, tmp_path / "a")
    after = evaluate(heads, table, data)
    assert sum(after["ce"]) < sum(before["ce"]) - 0.1
    assert whole[-1]["loss"] < whole[0]["loss"]
    fit(new_heads(tiny, base_name="tiny"), table, data, cfg, tmp_path / "b", max_steps=7)  # "killed" at step 7
    resumed = new_heads(tiny, base_name="tiny")
    log = fit(resumed, table, data, cfg, tmp_path / "b")
    assert [r["loss"] for r in log] == [r["loss"] for r in whole]
    assert json.dumps(evaluate(resumed, table, data)) == json.dumps(after)


def test_a_training_vocabulary_spans_the_softmax_over_the_likeliest_labels_only(tiny, tmp_path):
    """With ``train_vocab=N`` the first step's loss is each head's CE under a softmax over the N tokens
    most often head 0's label (labels outside skipped), computed here from the full logits; training
    that way raises the accuracy over those tokens, and over every token."""
    data, table, n = _features(512, 4), head_table(tiny), 24
    vocab = training_vocab(data, tiny.config.vocab_size, n)
    assert len(vocab) == n and np.all(np.diff(vocab) > 0)
    counts = label_counts(data, tiny.config.vocab_size)
    assert counts[vocab].min() >= np.delete(counts, vocab).max()
    heads = new_heads(tiny, base_name="tiny")
    logp = np.asarray(jax.nn.log_softmax(heads.logits(jnp.asarray(data.hidden), table)[..., vocab], axis=-1))
    inside = np.isin(data.labels, vocab)
    assert 0.2 < inside.mean() < 0.9  # some labels fall outside and are skipped
    index = np.searchsorted(vocab, np.maximum(data.labels, 0))
    ce = -np.take_along_axis(logp, np.minimum(index, n - 1)[..., None], axis=-1)[..., 0]
    want = sum(0.8 ** k * ce[inside[:, k], k].mean() for k in range(4))
    before = [sum(evaluate(heads, table, data, vocab=v)["top1"]) for v in (vocab, None)]
    log = fit(heads, table, data, HeadsTrainConfig(batch_size=512, epochs=30, lr=1e-2, train_vocab=n), tmp_path)
    assert log[0]["loss"] == pytest.approx(want, rel=1e-5)
    after = [sum(evaluate(heads, table, data, vocab=v)["top1"]) for v in (vocab, None)]
    assert after[0] > before[0] + 0.15 and after[1] > before[1] + 0.02
    soft = _soft(data.labels, 3, 0.7)  # the KL: target ids outside the vocabulary are left out, as labels are
    logp_soft = np.where(np.isin(soft.top_ids, vocab), np.take_along_axis(
        logp, np.minimum(np.searchsorted(vocab, np.maximum(soft.top_ids, 0)), n - 1), axis=-1), 0.0)
    probs = np.where(np.isin(soft.top_ids, vocab), soft.top_probs, 0.0)
    kl = np.sum(np.where(probs > 0, probs * (np.log(np.maximum(probs, 1e-30)) - logp_soft), 0.0), axis=-1)
    want_kl = sum(0.8 ** k * kl[inside[:, k], k].mean() for k in range(4))
    log = fit(new_heads(tiny, base_name="tiny"), table, data,
              HeadsTrainConfig(batch_size=512, epochs=1, train_vocab=n, loss="kl"), tmp_path / "kl", soft=soft)
    assert log[0]["loss"] == pytest.approx(want_kl, rel=1e-4)
    with pytest.raises(ValueError, match="train_vocab must be >= 0 .* got -1"):
        HeadsTrainConfig(train_vocab=-1)
    with pytest.raises(ValueError, match="needs shared_lm_head=True .* got 8 and shared_lm_head=False"):
        HeadsTrainConfig(train_vocab=8, shared_lm_head=False)


def _soft(labels: np.ndarray, k: int, first: float) -> SoftTargets:
    """Targets that give each label ``first`` and the next token (mod 97) the rest; none where no label."""
    ids = np.full(labels.shape + (k,), -1, np.int32)
    probs = np.zeros(ids.shape, np.float32)
    has = labels >= 0
    ids[..., 0], probs[..., 0] = np.where(has, labels, -1), np.where(has, first, 0.0)
    if first < 1:
        ids[..., 1], probs[..., 1] = np.where(has, (labels + 1) % 97, -1), np.where(has, 1 - first, 0.0)
    return SoftTargets(ids, probs)


def test_kl_loss_is_the_ce_for_one_hot_targets_and_kl_otherwise(tiny):
    heads, data, table = random_heads(tiny, 4, 0.5), _features(64, 2), head_table(tiny)
    graphdef, params = nnx.split(heads, nnx.Param)
    args = (graphdef, params, table, jnp.asarray(data.hidden), jnp.asarray(data.labels), 0.8)
    ce, acc = medusa_loss(*args)
    one_hot, acc_kl = medusa_loss(*args, SoftTargets(*map(jnp.asarray, _soft(data.labels, 3, 1.0))))
    assert float(one_hot) == pytest.approx(float(ce), rel=1e-5) and np.array_equal(acc, acc_kl)
    logq = np.asarray(jax.nn.log_softmax(heads.logits(jnp.asarray(data.hidden), table), axis=-1), np.float64)
    has, rows = data.labels >= 0, np.arange(len(data.labels))[:, None]
    kl = 0.7 * (np.log(0.7) - logq[rows, np.arange(4), data.labels]) + 0.3 * (
        np.log(0.3) - logq[rows, np.arange(4), (data.labels + 1) % 97])
    want = sum(0.8 ** k * kl[has[:, k], k].mean() for k in range(4))
    got, _ = medusa_loss(*args, SoftTargets(*map(jnp.asarray, _soft(data.labels, 3, 0.7))))
    assert float(got) == pytest.approx(want, rel=1e-4)


def test_kl_training_lowers_loss_and_resumes_exactly(tiny, tmp_path):
    data, table = _features(512, 3), head_table(tiny)
    soft = _soft(data.labels, 4, 0.6)
    cfg = HeadsTrainConfig(batch_size=64, epochs=4, lr=1e-2, checkpoint_every=5, loss="kl")

    def kl_of(heads):  # on all positions
        graphdef, params = nnx.split(heads, nnx.Param)
        return float(medusa_loss(graphdef, params, table, jnp.asarray(data.hidden), jnp.asarray(data.labels), 0.8,
                                 SoftTargets(*map(jnp.asarray, soft)))[0])

    heads = new_heads(tiny, base_name="tiny")
    before = kl_of(heads)
    whole = fit(heads, table, data, cfg, tmp_path / "a", soft=soft)
    assert kl_of(heads) < before - 0.3
    fit(new_heads(tiny, base_name="tiny"), table, data, cfg, tmp_path / "b", max_steps=6, soft=soft)
    log = fit(new_heads(tiny, base_name="tiny"), table, data, cfg, tmp_path / "b", soft=soft)
    assert [r["loss"] for r in log] == [r["loss"] for r in whole]
    with pytest.raises(ValueError, match="loss must be one of .* and teacher_top_k >= 1"):
        HeadsTrainConfig(loss="mse")
    with pytest.raises(ValueError, match="teacher_top_k >= 1, got 'kl' and 0"):
        HeadsTrainConfig(loss="kl", teacher_top_k=0)


def test_soft_targets_are_the_targets_distribution_over_each_label(tiny_lm, tmp_path, monkeypatch):
    """On the target's own greedy replies the likeliest token of each kept distribution is the head's
    label (the target chose it there); distributions line up with the features, sorted, and are empty
    where a head has no label; the packed rows are made once and cached; from a feature-draft run's
    rows (float16 hidden states) the same distributions come out."""
    import training.medusa

    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 97, rng.integers(2, 8)).tolist() for _ in range(6)]
    outs = specdec.generate(tiny_lm, prompts, max_new_tokens=20, ignore_eos=True)
    examples = [Example(p + o.tokens, [0] * len(p) + [1] * len(o.tokens)) for p, o in zip(prompts, outs)]
    made = []
    monkeypatch.setattr(training.medusa, "split_examples", lambda lm, cfg, split: made.append(split) or examples)
    cfg = HeadsTrainConfig(work_dir=str(tmp_path / "own"), seq_len=32, loss="kl", teacher_top_k=4)
    feats, soft = prepare_features(tiny_lm, cfg, "train"), prepare_soft(tiny_lm, cfg, "train")
    assert made == ["train"] and soft.top_ids.shape == feats.labels.shape + (4,)
    has = feats.labels >= 0
    np.testing.assert_array_equal(soft.top_ids[..., 0][has], feats.labels[has])
    assert (soft.top_ids[~has] == -1).all() and (soft.top_probs[~has] == 0).all()
    assert (np.diff(soft.top_probs[has], axis=-1) <= 0).all() and (soft.top_probs.sum(-1) <= 1 + 1e-5).all()
    np.savez(tmp_path / "features-train.npz", **target_rows(tiny_lm, pack(examples, 32))._asdict())
    rows = prepare_soft(tiny_lm, HeadsTrainConfig(rows_from=str(tmp_path), work_dir=str(tmp_path / "rows"),
                                                  loss="kl", teacher_top_k=4), "train")
    np.testing.assert_allclose(rows.top_probs, soft.top_probs, atol=5e-3)
    assert (rows.top_ids == soft.top_ids).mean() > 0.9


def test_evaluate_within_a_head_vocabulary(tiny):
    """Accuracy when the heads rank only some tokens: every token -> the full figures; a label outside
    the vocabulary is a miss, however few tokens are allowed."""
    heads, data, table = random_heads(tiny, 6, 0.5), _features(256, 1), head_table(tiny)
    full = evaluate(heads, table, data)
    everything = evaluate(heads, table, data, vocab=np.arange(97))
    assert everything["topk"] == full["topk"] and "ce" not in everything
    few = np.arange(0, 97, 3)[:4]  # 4 tokens: top-10 would hit every label without the rule
    inside = np.isin(data.labels, few)
    got = np.asarray(evaluate(heads, table, data, vocab=few)["topk"])
    np.testing.assert_allclose(got[:, -1], inside.sum(0) / (data.labels >= 0).sum(0), atol=1e-4)


def test_heads_train_on_the_rows_of_a_feature_draft_run(tiny_lm, tmp_path):
    """``rows_from``: hidden states and head targets read from a feature-draft run's cached rows equal
    what the heads' own pipeline computes from the same packed rows; rows made with another model, a
    directory without the split and data settings that the rows would override are clear errors."""
    packed = greedy_rows(tiny_lm, 6, 0)
    np.savez(tmp_path / "features-train.npz", **target_rows(tiny_lm, packed)._asdict())
    got = prepare_features(tiny_lm, HeadsTrainConfig(rows_from=str(tmp_path)), "train")
    want = backbone_features(tiny_lm, packed, head_labels(packed, 4))
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.hidden, want.hidden, rtol=2e-3, atol=2e-3)  # cached in float16
    other = LoadedModel.from_module(init_model(tiny_config(), seed=1), name="other")
    with pytest.raises(ValueError, match="not made with this model"):
        rows_features(other, tmp_path, "train", 4)
    with pytest.raises(FileNotFoundError, match="feature-draft work directory"):
        rows_features(tiny_lm, tmp_path, "heldout", 4)
    with pytest.raises(ValueError, match="--conversations, --seq-len would be ignored"):
        HeadsTrainConfig(rows_from=str(tmp_path), conversations=5, seq_len=64)


def test_accuracy_of_heads_trained_on_rows_no_longer_here(tiny_lm, tiny, tmp_path):
    """Heads trained with ``rows_from`` on another machine: measuring their accuracies there is a clear
    error that names the fix (reuse the accuracies saved with them)."""
    save_heads(new_heads(tiny, base_name="tiny"), tmp_path,
               {"training": {"config": {"model": "tiny", "rows_from": str(tmp_path / "gone")}}})
    with pytest.raises(FileNotFoundError, match="feature-draft work directory.*--accuracy-from .*tree.json"):
        heldout_accuracy(tiny_lm, load_heads(tmp_path, tiny), tmp_path)


def test_head_ranks_replay_exactly_what_medusa_decoding_does(tiny_lm, tiny):
    """The heads' ranks of the target's own greedy replies, replayed with a tree, take as many target
    forwards per row as Medusa decoding with that tree took to write those replies."""
    heads = random_heads(tiny, 5, 0.1)
    tree = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)]
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 5, 7, 4, 6)]
    outs = specdec.generate(tiny_lm, prompts, method="medusa", heads=heads, tree=tree, max_new_tokens=24,
                            ignore_eos=True)
    examples = [Example(p + o.tokens, [0] * len(p) + [1] * len(o.tokens)) for p, o in zip(prompts, outs)]
    replies = heads_reply_ranks(heads, head_table(tiny), target_rows(tiny_lm, pack(examples, 64)), max_rank=8)
    assert [len(r) for r in replies] == [24] * len(prompts)
    assert [replay_counts([r], tree, 8) for r in replies] == [(23, o.target_forwards) for o in outs]
    assert sum(o.target_forwards for o in outs) < 23 * len(prompts)  # some steps accepted drafts


def test_heads_trees_from_the_held_out_split(tiny_lm, tiny, tmp_path):
    """``specdec heads-tree``: trees of the heads' ranks on the held-out rows of their training run, usable as
    Medusa trees; heads without a recorded training run are a clear error."""
    np.savez(tmp_path / "features-heldout.npz", **target_rows(tiny_lm, greedy_rows(tiny_lm, 6, 2))._asdict())
    heads_dir = tmp_path / "heads"
    save_heads(random_heads(tiny, 5, 0.1), heads_dir, {"training": {"config": {"rows_from": str(tmp_path)}}})
    rows = write_heads_trees(tiny_lm, heads_dir, [1, 6], tmp_path / "trees", max_rank=4, head_vocab=0)
    assert [(r["file"], r["nodes"]) for r in rows] == [("tree-1.json", 1), ("tree-6.json", 6)]
    assert rows[0]["paths"] == [[0]] and rows[1]["max_rank"] == 4 and rows[1]["cross_tokens_per_forward"] > 1.0
    assert rows[1]["decoded_tokens_per_forward"] >= rows[0]["decoded_tokens_per_forward"] > 1.0
    out = specdec.generate(tiny_lm, [3, 4, 5], method="medusa", heads=load_heads(heads_dir, tiny),
                           tree=str(tmp_path / "trees" / "tree-6.json"), max_new_tokens=8)
    assert len(out.tokens) == 8
    save_heads(new_heads(tiny, base_name="tiny"), tmp_path / "untrained")
    with pytest.raises(ValueError, match="records no training config"):
        write_heads_trees(tiny_lm, tmp_path / "untrained", [4], tmp_path / "trees")
    with pytest.raises(ValueError, match="at least 1 node"):
        write_heads_trees(tiny_lm, heads_dir, [0], tmp_path / "trees")
    with pytest.raises(ValueError, match="max_rank must be at least 1"):
        write_heads_trees(tiny_lm, heads_dir, [4], tmp_path / "trees", max_rank=0)


def test_reply_runs_stay_inside_one_example():
    """A run starts after its example's first token (the first step's root) and ends at a segment change."""
    mask = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 0], bool)
    segments = np.array([1, 1, 1, 1, 1, 2, 2, 3, 0, 0])
    assert reply_runs(mask, segments) == [(1, 2), (3, 5), (6, 7)]  # 8: padding (segment 0)
    assert reply_runs(np.array([0, 1, 1], bool), np.ones(3, int)) == [(1, 3)]  # to the row's end
    assert reply_runs(np.zeros(4, bool), np.ones(4, int)) == []


def test_head_ranks_within_a_head_vocabulary(tiny_lm, tiny):
    """Ranking within ``vocab``: every token in any order ranks as with no vocabulary; without the token of
    a label that ranked, that label is out (max_rank), and no rank rises; bad vocabularies are clear errors."""
    heads, table = random_heads(tiny, 5, 0.1), head_table(tiny)
    rows = target_rows(tiny_lm, greedy_rows(tiny_lm, 4, 3))
    full = heads_reply_ranks(heads, table, rows, max_rank=8)
    order = np.random.default_rng(0).permutation(tiny.config.vocab_size)
    np.testing.assert_array_equal(np.concatenate(heads_reply_ranks(heads, table, rows, 8, vocab=order)),
                                  np.concatenate(full))
    a, _ = reply_runs(rows.mask[0], rows.segments[0])[0]
    j = int(np.flatnonzero(full[0][:, 0] < 8)[0])  # entry j's head-0 label is the target's token at a + j
    cut = heads_reply_ranks(heads, table, rows, 8, vocab=order[order != rows.greedy[0][a + j]])
    assert cut[0][j, 0] == 8
    assert np.all((np.concatenate(cut) <= np.concatenate(full)) | (np.concatenate(cut) == 8))
    with pytest.raises(ValueError, match="share the base LM head"):
        heads_reply_ranks(new_heads(tiny, base_name="tiny", shared_lm_head=False), table, rows, 8, vocab=order)
    for bad in ([1, 1, 2], [0, tiny.config.vocab_size]):
        with pytest.raises(ValueError, match="distinct token ids in"):
            heads_reply_ranks(heads, table, rows, 8, vocab=bad)


def test_top1_top5_columns_read_each_heads_first_and_fifth_accuracy():
    topk = [[0.5, 0.6, 0.7, 0.75, 0.8, 0.9], [0.25, 0.3, 0.35, 0.4, 0.4567, 0.5]]
    assert top1_top5(topk) == {"top1": "0.500 / 0.250", "top5": "0.800 / 0.457"}

"""Feature drafts (EAGLE style): training, resume, save/load, and the proposer's feature bookkeeping.

Equivalence to autoregressive decoding in ragged batches, the pool, by-load schedules and budgets is
covered with the other proposers (``methods["eagle"]`` in test_batch and test_budget).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specdec
from conftest import greedy_rows
from heads.feature_draft import default_spec, feature_draft_for, load_feature_draft, new_feature_draft, \
    save_feature_draft
from specdec.autoregressive import plan_shapes, prompt_arrays
from specdec.cache import init_cache
from specdec.config import tiny_config
from specdec.engine import propose_jit, verify_jit, spec_prefill
from specdec.loading import LoadedModel
from specdec.methods import build_proposer
from specdec.model import forward, init_model
from specdec.sampling import Sampling
from training.rank_trees import path_shares, write_draft_trees
from training.feature_draft import FeatureDraftTrainConfig, unrolled, batch_arrays, evaluate, fit, initial_draft, \
    reply_ranks, target_rows
from training.loop import run_dir_of


@pytest.fixture(scope="module")
def toy(tiny_lm):
    return target_rows(tiny_lm, greedy_rows(tiny_lm, 48, 0)), target_rows(tiny_lm, greedy_rows(tiny_lm, 16, 1))


def _cfg(**kw):
    return FeatureDraftTrainConfig(**{"batch_size": 8, "epochs": 2.0, "lr": 3e-3, "warmup": 0.1,
                                      "checkpoint_every": 4, "vocab_size": 0, **kw})


@pytest.fixture(scope="module")
def trained(tiny, toy, tmp_path_factory):
    """A feature draft trained on the tiny target's own greedy text, with its held-out figures before."""
    train, heldout = toy
    spec = default_spec(tiny, None)
    draft = new_feature_draft(tiny, spec)
    before = evaluate(draft, heldout, unroll=2)
    log = fit(draft, spec, train, _cfg(epochs=40.0, checkpoint_every=1000), tmp_path_factory.mktemp("fd"))
    return draft, before, log


def test_training_lowers_both_losses_and_raises_acceptance(trained, toy):
    draft, before, log = trained
    after = evaluate(draft, toy[1], unroll=2)
    assert after["ce"][0] < before["ce"][0] - 0.5 and after["feature"][0] < before["feature"][0]
    assert after["greedy_accept"][0] > before["greedy_accept"][0] + 0.2, (before, after)
    assert after["greedy_accept"][1] > before["greedy_accept"][1]  # the unrolled depth learns too
    assert log[-1]["loss"] < log[0]["loss"]


def _kl_to_target(tiny, draft, data) -> float:
    """Mean forward KL at depth 1 from the target's next-token distribution (its own logits over the
    cached next features) to the draft's, over the entries training scores; computed here, not by the
    training loss under test."""
    batch = batch_arrays(data, slice(None), None, tiny.config.vocab_size)
    log_q = jax.nn.log_softmax(next(unrolled(draft, batch, 1))[1], axis=-1)
    p = jax.nn.softmax(tiny.logits(jnp.asarray(batch["features"][:, 1:], jnp.float32)), axis=-1)
    kl = jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-30)) - log_q), axis=-1)
    scored = batch["valid"] & (batch["labels"] >= 0)
    return float(jnp.sum(jnp.where(scored, kl, 0.0)) / jnp.sum(scored))


def test_kl_loss_fits_the_targets_distribution_and_raises_acceptance(tiny, toy, tmp_path):
    """``loss="kl"`` trains on the target's whole next-token distribution (EAGLE's loss): the KL to
    it, measured against the target's own logits, falls close to 0 and greedy acceptance rises."""
    train, heldout = toy
    spec = default_spec(tiny, None)
    draft = new_feature_draft(tiny, spec)
    kl_before, before = _kl_to_target(tiny, draft, train), evaluate(draft, heldout, unroll=2)
    fit(draft, spec, train, _cfg(loss="kl", epochs=40.0, checkpoint_every=1000), tmp_path)
    kl_after, after = _kl_to_target(tiny, draft, train), evaluate(draft, heldout, unroll=2)
    assert kl_before > 0.5 and 0 <= kl_after < kl_before / 4, (kl_before, kl_after)
    assert after["greedy_accept"][0] > before["greedy_accept"][0] + 0.2, (before, after)
    with pytest.raises(ValueError, match="loss must be one of"):
        _cfg(loss="tv")


def test_resume_is_exact_and_only_for_the_same_config(tiny, toy, tmp_path):
    train = toy[0]
    spec = default_spec(tiny, None)
    whole = new_feature_draft(tiny, spec)
    log = fit(whole, spec, train, _cfg(), tmp_path / "a")
    fit(killed := new_feature_draft(tiny, spec), spec, train, _cfg(), tmp_path / "b", max_steps=5)
    other = fit(new_feature_draft(tiny, spec), spec, train, _cfg(lr=1e-3, out="elsewhere"), tmp_path / "b",
                max_steps=2)  # another config in the same work directory starts afresh
    assert [r["step"] for r in other] == [0, 1]  # not the 5 steps of the checkpoint beside it
    same, moved = run_dir_of(_cfg(), tmp_path), run_dir_of(_cfg(out="x", checkpoint_every=9), tmp_path)
    assert same == moved != run_dir_of(_cfg(lr=1e-3), tmp_path) != run_dir_of(_cfg(init="layers"), tmp_path)
    resumed = new_feature_draft(tiny, spec, seed=1)  # other initial weights: only the checkpoint can match `whole`
    log_b = fit(resumed, spec, train, _cfg(), tmp_path / "b")
    assert killed is not resumed and [r["loss"] for r in log_b] == [r["loss"] for r in log]
    for a, b in zip(jax.tree.leaves(nnx.state(whole)), jax.tree.leaves(nnx.state(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_fine_tunes_the_saved_draft(tiny, tiny_lm, trained, toy, tmp_path):
    """``init_from`` starts from a saved draft (its parameters, not a new draft's), and refuses one of
    another shape with the flags that would fit it."""
    draft, _, log = trained
    spec = default_spec(tiny, None)
    save_feature_draft(draft, spec, tiny, tmp_path / "fd", target_name="tiny", dtype="float32")
    start, start_spec = initial_draft(tiny_lm, _cfg(init_from=str(tmp_path / "fd")), toy[0])
    for a, b in zip(jax.tree.leaves(nnx.state(draft)), jax.tree.leaves(nnx.state(start))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh = initial_draft(tiny_lm, _cfg(), toy[0])[0]
    assert evaluate(fresh, toy[1], unroll=1)["ce"][0] > evaluate(start, toy[1], unroll=1)["ce"][0] + 0.5
    tuned = fit(start, start_spec, toy[0], _cfg(init_from=str(tmp_path / "fd"), epochs=1.0), tmp_path / "w")
    assert tuned[0]["loss"] < log[0]["loss"] / 2  # its first step already sees a trained draft
    with pytest.raises(ValueError, match="pass --n-layers 1 --vocab-size 0 to fine-tune it"):
        initial_draft(tiny_lm, _cfg(init_from=str(tmp_path / "fd"), n_layers=2), toy[0])
    with pytest.raises(FileNotFoundError, match="feature_draft_config.json is missing"):
        initial_draft(tiny_lm, _cfg(init_from=str(tmp_path / "nothing")), toy[0])


def test_reply_ranks_agree_with_the_held_out_acceptance(tiny, tiny_lm, trained, toy, tmp_path):
    """Rank 0 at depth 1 from every root is the depth-1 greedy acceptance of ``evaluate``; a saved draft
    without its training config has no known held-out split for ``specdec draft-tree``."""
    draft, heldout = trained[0], toy[1]
    replies = reply_ranks(draft, heldout, depth=3, max_rank=4)
    figures = evaluate(draft, heldout, unroll=1)
    assert sum(len(r) for r in replies) == figures["positions"]
    assert path_shares(replies, 4)[(0,)] == pytest.approx(figures["greedy_accept"][0], abs=1e-4)
    save_feature_draft(draft, default_spec(tiny, None), tiny, tmp_path / "fd", target_name="tiny", dtype="float32")
    with pytest.raises(ValueError, match="records no training config"):
        write_draft_trees(tiny_lm, tmp_path / "fd", [4], tmp_path / "trees")


def _reference_logits(target, draft, size: int = 40):
    """``logits(seq, drafted)``: the draft's logits ``[V]`` for the token after ``drafted`` (tokens drafted
    after ``seq``, which ends at the root), from scratch: the target's features of ``seq[:-1]``
    teacher-forced, then the draft over every entry, each drafted token entered with the guess the entry
    before made. Entries are padded to ``size`` (causal: padding never reaches them) so each pass
    compiles once. Each pass gets its own copy of ``tokens``, which changes while a pass may still run
(the device array may share a host buffer: with ``jnp.array(tokens)`` alone a pass read later tokens)."""
    positions = jnp.arange(size)[None]
    features = jax.jit(lambda tokens: forward(target, init_cache(target.config, 1, size), tokens=tokens,
                                              positions=positions, compute_logits=False).hidden)
    run = jax.jit(lambda feats, tokens: draft.run(init_cache(draft.config, 1, size), feats, tokens, positions))

    def logits(seq: list[int], drafted: list[int]) -> np.ndarray:
        n = len(seq) - 1
        tokens = np.zeros((1, size), np.int32)
        tokens[0, :n] = seq[:-1]
        feats = features(jnp.asarray(tokens.copy()))
        tokens[0, :n] = seq[1:]
        for t, token in enumerate(drafted, start=n):
            feats = feats.at[:, t].set(run(feats, jnp.asarray(tokens.copy())).hidden[:, t - 1])
            tokens[0, t] = token
        return np.asarray(run(feats, jnp.asarray(tokens.copy())).logits[0, n + len(drafted) - 1])

    return logits


def _reference_chain(target, draft):
    """``chain(seq, k)``: the k greedy draft tokens after ``seq`` (see :func:`_reference_logits`)."""
    logits = _reference_logits(target, draft)

    def chain(seq: list[int], k: int) -> list[int]:
        out = []
        for _ in range(k):
            out.append(int(np.argmax(logits(seq, out))))
        return out

    return chain


def test_every_proposal_is_the_draft_run_over_the_committed_features(tiny, tiny_lm, trained):
    """Step by step through ragged rows: each proposal equals the draft run from scratch over the
    target's features of everything committed (so accepted nodes' features, not guesses, are entered),
    and steps accept several tokens."""
    draft = trained[0]
    k = 3
    chain = _reference_chain(tiny, draft)
    proposer, pparams = build_proposer("eagle", tiny_lm, {"feature_draft": draft, "k": k})
    prompts = [[5, 17, 3, 9, 22], [40, 2], [8, 8, 31, 64, 12, 7, 1, 90]]
    shapes = plan_shapes(tiny_lm.config, [len(p) for p in prompts], [20] * 3, extra=proposer.tree.size)
    sampling = Sampling()
    st = spec_prefill(tiny_lm.graphdef, tiny_lm.state, proposer, pparams,
                      *prompt_arrays(prompts, shapes, [20] * 3, [0] * 3), shapes=shapes, sampling=sampling,
                      eos_ids=(), max_depth=k)
    accepted = []
    while not bool(jnp.all(st.dec.done)):
        pstate, prop = propose_jit(tiny_lm.graphdef, tiny_lm.state, proposer, pparams, st, sampling=sampling,
                                    rule="exact")
        history, lengths = np.asarray(st.history), np.asarray(st.dec.cache.lengths)
        for row in np.flatnonzero(~np.asarray(st.dec.done)):
            seq = history[row, :lengths[row] + 1].tolist()
            assert np.asarray(prop.tokens[row]).tolist() == chain(seq, k), (row, seq)
        new = verify_jit(tiny_lm.graphdef, tiny_lm.state, proposer, pparams, st, pstate, prop, sampling=sampling,
                          rule="exact", eos_ids=())
        accepted += (np.asarray(new.dec.cache.lengths) - lengths - 1)[~np.asarray(st.dec.done)].tolist()
        st = new
    assert max(accepted) >= 2 and np.mean(accepted) > 0.5, accepted


def test_every_node_of_a_tree_of_ranks_is_its_paths_draft_token(tiny, tiny_lm, trained):
    """A tree of draft ranks through ragged rows, step by step: each node is the token of its rank after
    its parent's path, from the draft run from scratch over the committed features and that path."""
    paths = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (1, 0, 1)]
    logits = _reference_logits(tiny, trained[0])
    proposer, pparams = build_proposer("eagle", tiny_lm, {"feature_draft": trained[0], "tree": paths})
    assert proposer.tree.parents == (-1, 0, 0, 0, 1, 1, 2, 4, 5, 6)
    prompts = [[5, 17, 3, 9, 22], [40, 2]]
    shapes = plan_shapes(tiny_lm.config, [len(p) for p in prompts], [8] * 2, extra=proposer.tree.size)
    sampling = Sampling()
    st = spec_prefill(tiny_lm.graphdef, tiny_lm.state, proposer, pparams,
                      *prompt_arrays(prompts, shapes, [8] * 2, [0] * 2), shapes=shapes, sampling=sampling,
                      eos_ids=(), max_depth=3)
    for _ in range(3):
        pstate, prop = propose_jit(tiny_lm.graphdef, tiny_lm.state, proposer, pparams, st, sampling=sampling,
                                    rule="exact")
        history, lengths = np.asarray(st.history), np.asarray(st.dec.cache.lengths)
        for row in range(len(prompts)):
            seq, node = history[row, :lengths[row] + 1].tolist(), {}
            for i, path in enumerate(paths):
                order = np.argsort(-logits(seq, [node[path[:d]] for d in range(1, len(path))]), kind="stable")
                node[path] = int(order[path[-1]])
                assert int(prop.tokens[row, i]) == node[path], (row, seq, path)
        st = verify_jit(tiny_lm.graphdef, tiny_lm.state, proposer, pparams, st, pstate, prop, sampling=sampling,
                         rule="exact", eos_ids=())


def test_greedy_output_with_the_trained_draft_is_autoregressive(tiny_lm, trained):
    prompts = [[5, 17, 3], [40, 2, 77, 1], [9]]
    alone = specdec.generate(tiny_lm, prompts, max_new_tokens=[30, 12, 25], ignore_eos=True)
    for k, width, branches in ((4, 1, 1), (2, 3, 1), (3, 1, 3)):
        out = specdec.generate(tiny_lm, prompts, max_new_tokens=[30, 12, 25], ignore_eos=True, method="eagle",
                               feature_draft=trained[0], k=k, draft_width=width, draft_branches=branches)
        assert [g.tokens for g in out] == [g.tokens for g in alone]
        assert out[0].stats.target_forwards < alone[0].stats.target_forwards  # it accepts drafts
    tree = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)]
    out = specdec.generate(tiny_lm, prompts, max_new_tokens=[30, 12, 25], ignore_eos=True, method="eagle",
                           feature_draft=trained[0], tree=tree)
    assert [g.tokens for g in out] == [g.tokens for g in alone]
    assert out[0].stats.target_forwards < alone[0].stats.target_forwards
    with pytest.raises(ValueError, match="a tree .of draft ranks. or k / draft_width / draft_branches, not both"):
        specdec.generate(tiny_lm, prompts, method="eagle", feature_draft=trained[0], tree=tree, k=2)


def test_save_load_roundtrip_and_clear_errors(tiny, tiny_lm, trained, tmp_path):
    draft = trained[0]
    spec = default_spec(tiny, None)
    save_feature_draft(draft, spec, tiny, tmp_path / "fd", target_name="tiny", dtype="float32")
    back = load_feature_draft(tmp_path / "fd", tiny_lm)
    for a, b in zip(jax.tree.leaves(nnx.state(draft)), jax.tree.leaves(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert feature_draft_for(tiny_lm, tmp_path / "fd") is feature_draft_for(tiny_lm, tmp_path / "fd")
    other = LoadedModel.from_module(init_model(tiny_config(), seed=5), name="other")
    with pytest.raises(ValueError, match="was trained for target 'tiny'"):
        load_feature_draft(tmp_path / "fd", other)
    with pytest.raises(ValueError, match="ships no feature draft"):
        specdec.generate(other, [1, 2], method="eagle")
    wide = LoadedModel.from_module(init_model(tiny_config(d_model=48), seed=0), name="wide")
    with pytest.raises(ValueError, match="features of width 32"):
        specdec.generate(wide, [1, 2], method="eagle", feature_draft=draft)
    with pytest.raises(FileNotFoundError, match="feature_draft_config.json is missing"):
        load_feature_draft(tmp_path / "nothing", tiny_lm)
    with pytest.raises(ValueError, match="share_embeddings"):
        new_feature_draft(tiny, default_spec(tiny, None).__class__(n_layers=1, init="random",
                                                                   share_embeddings=False))

"""Medusa: tree buffers, tree search, heads save/load, decoding equivalence (training: test_medusa_training.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec
from specdec import engine
from heads.medusa import TOKEN_COUNTS_FILE, head_vocabulary, load_heads, new_heads, save_heads
from heads.proposer import medusa_proposer
from specdec.model import head_table
from specdec.tree import (BUILTIN_TREES, candidate_tokens, chain_spec, expected_accepted, grow_tree, load_spec,
                          tree_buffers)
from heads.tree_search import rank_accuracy, search_tree
from conftest import random_heads
from specdec.config import tiny_config
from specdec.equivalence import check
from specdec.methods import build_proposer
from specdec.model import init_model
from training.features import Features
from training.medusa import label_counts


def test_tree_buffers_hand_checked():
    spec = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 2)]
    b = tree_buffers(list(reversed(spec)))  # order of the spec does not matter
    assert b.tree.parents == (-1, 0, 0, 1, 1, 2, 3)
    assert b.head.tolist() == [0, 0, 1, 1, 1, 2]
    assert b.rank.tolist() == [0, 1, 0, 1, 0, 2]
    assert b.top_k == 3
    assert b.tree.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    anc = np.zeros((7, 7), bool)
    for i, chain in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 1, 3, 6]]):
        anc[i, chain] = True
    np.testing.assert_array_equal(b.tree.ancestors, anc)
    assert b.tree.path_to[6].tolist() == [0, 1, 3, 6]
    assert b.tree.path_to[5].tolist() == [0, 2, 5, 5]
    top = jnp.asarray([[[10, 11, 12], [20, 21, 22], [30, 31, 32]]])  # [B=1, heads, K]
    assert candidate_tokens(top, b).tolist() == [[10, 11, 20, 21, 20, 32]]


def test_bad_specs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="no parent path"):
        tree_buffers([(0,), (1, 0)])
    with pytest.raises(ValueError, match="ranks >= 0"):
        tree_buffers([(0,), (0, -1)])
    with pytest.raises(ValueError, match="unknown tree"):
        load_spec("tree-17")
    (tmp_path / "cut.json").write_text("[[0], [1")
    with pytest.raises(ValueError, match="cut.json is corrupt.*JSON list of paths"):
        load_spec(str(tmp_path / "cut.json"))


def test_builtin_trees_have_their_sizes():
    for name, spec in BUILTIN_TREES.items():
        n = int(name.split("-")[1])
        assert len(spec) == (n if name.startswith("chain") else n - 1)
        assert tree_buffers(spec).tree.max_depth <= 4


def test_expected_accepted_and_greedy_growth():
    acc = np.array([[0.5, 0.19], [0.4, 0.1]])
    assert expected_accepted(chain_spec(2), acc) == pytest.approx(0.5 + 0.5 * 0.4)
    assert expected_accepted([(0,), (1,), (0, 0), (1, 0)], acc) == pytest.approx(0.5 + 0.19 + 0.2 + 0.076)
    assert grow_tree(acc, 2) == [(0,), (0, 0)]  # 0.5 * 0.4 beats 0.19
    assert grow_tree(acc, 3) == [(0,), (1,), (0, 0)]
    assert grow_tree(acc, 4) == [(0,), (1,), (0, 0), (1, 0)]  # 0.076 beats 0.5 * 0.1
    np.testing.assert_allclose(rank_accuracy([[0.5, 0.7, 0.7]]), [[0.5, 0.2, 0.0]])


def test_search_follows_the_cost_curve():
    acc = rank_accuracy([[0.6, 0.75, 0.8], [0.4, 0.5, 0.55], [0.3, 0.4, 0.45]])
    flat, _ = search_tree(acc, lambda n: 1.0, max_nodes=20)
    steep, rows = search_tree(acc, lambda n: float(n), max_nodes=20)
    assert len(flat) == 20 and len(steep) == 1
    assert [r.nodes for r in rows] == list(range(1, 21))
    table, _ = search_tree(acc, {1: 1.0, 2: 1.02, 4: 1.05, 8: 1.1, 16: 3.0, 32: 6.0}, max_nodes=30)
    assert 3 <= len(table) <= 15
    # heads that cost more the deeper the tree: every larger tree here reaches depth 2, so one node wins
    shallow, rows = search_tree(acc, lambda n: 1.0, max_nodes=20, depth_cost=[0.0, 0.1, 5.0, 10.0])
    assert shallow == [(0,)] and len(flat) == 20
    assert [r.relative_cost for r in rows[:2]] == pytest.approx([1.1, 6.0])


def test_heads_save_load_and_wrong_base(tiny, tmp_path):
    heads = random_heads(tiny, 1, 0.3, shared_lm_head=False)
    x = jax.random.normal(jax.random.key(0), (3, tiny.config.d_model))
    save_heads(heads, tmp_path / "h", {"note": 1})
    again = load_heads(tmp_path / "h", tiny)
    np.testing.assert_array_equal(again.logits(x, None), heads.logits(x, None))
    other = init_model(tiny_config(), seed=5)
    with pytest.raises(ValueError, match="trained for base model 'tiny'"):
        load_heads(tmp_path / "h", other)
    with pytest.raises(FileNotFoundError, match="medusa_config.json is missing"):
        load_heads(tmp_path, tiny)
    (tmp_path / "h" / "medusa_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_heads(tmp_path / "h", tiny)


def test_fresh_heads_are_the_base_head(tiny):
    x = jax.random.normal(jax.random.key(1), (2, tiny.config.d_model))
    for shared in (True, False):
        heads = new_heads(tiny, base_name="tiny", shared_lm_head=shared)
        out = heads.logits(x, head_table(tiny))
        np.testing.assert_allclose(out, jnp.broadcast_to(tiny.logits(x)[:, None], out.shape), atol=1e-5)


def test_logits_of_the_first_heads_only(tiny):
    """A tree D deep asks for D heads: the same logits as the first D of all heads."""
    heads = random_heads(tiny, 4, 0.5)
    x = jax.random.normal(jax.random.key(2), (3, tiny.config.d_model))
    full = heads.logits(x, head_table(tiny))
    for n in (1, 3):
        np.testing.assert_array_equal(heads.logits(x, head_table(tiny), n), full[:, :n])


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.sampled_from(["chain-1", "chain-3", "tree-8", "tree-16", "tree-64"]), scale=st.sampled_from([0.0, 0.5]),
       lens=st.lists(st.integers(1, 30), min_size=2, max_size=6), temperature=st.sampled_from([0.0, 0.9]),
       data=st.data())
def test_medusa_rows_equal_autoregressive(tiny_lm, tiny, tree, scale, lens, temperature, data):
    """Greedy and coupled sampling, batch > 1, several trees: every row identical to autoregressive."""
    heads = random_heads(tiny, 3, scale)
    rng = np.random.default_rng(sum(lens))
    prompts = [rng.integers(0, 97, n).tolist() for n in lens]
    max_new = data.draw(st.lists(st.integers(1, 24), min_size=len(lens), max_size=len(lens)))
    report = check(tiny_lm, prompts, "medusa", batch_size=len(prompts), heads=heads, tree=tree,
                   max_new_tokens=max_new, temperature=temperature, top_k=20 if temperature else 0,
                   seed=list(range(len(lens))))
    assert report.counts["identical"] == len(prompts), report.table()


def test_medusa_accepts_drafts_and_reports(tiny_lm, tiny):
    """Fresh heads repeat the base prediction, which a looping random model often confirms."""
    res = specdec.generate(tiny_lm, [[5, 6, 7], [9] * 12], method="medusa", heads=new_heads(tiny, base_name="t"),
                           tree="tree-16", max_new_tokens=40)
    assert all(sum(r.accepted_histogram[1:]) > 0 for r in res)
    assert all(r.accepted_per_forward > 1.0 for r in res)
    typical = specdec.generate(tiny_lm, [5, 6, 7], method="medusa", heads=new_heads(tiny, base_name="t"),
                               tree="tree-8", verification="typical", temperature=0.7, max_new_tokens=12)
    assert len(typical.tokens) == 12


def test_restored_heads_compile_one_chunk_program(tiny_lm, tiny, tmp_path):
    """Heads restored from disk are committed to a device: the prefilled state must come out placed
    like every chunk's output, or the second chunk compiles the decode loop again."""
    save_heads(random_heads(tiny, 2, 0.3), tmp_path / "h")
    heads = load_heads(tmp_path / "h", tiny)
    engine.spec_chunk.clear_cache()
    specdec.generate(tiny_lm, [5, 6, 7], method="medusa", heads=heads, tree="chain-1", max_new_tokens=12,
                     chunk_steps=2)
    assert engine.spec_chunk._cache_size() == 1


def test_medusa_bad_input(tiny_lm, tiny):
    heads = new_heads(tiny, base_name="t", n_heads=2)
    with pytest.raises(ValueError, match="only 2 heads"):
        specdec.generate(tiny_lm, [1, 2], method="medusa", heads=heads, tree="chain-3")
    foreign = new_heads(init_model(tiny_config(), seed=9), base_name="other")
    with pytest.raises(ValueError, match="trained for base model 'other'"):
        specdec.generate(tiny_lm, [1, 2], method="medusa", heads=foreign)
    with pytest.raises(ValueError, match="ships no Medusa heads"):
        specdec.generate(tiny_lm, [1, 2], method="medusa")


def _heads_with_counts(tiny, path, seed: int = 3, extra: dict | None = None):
    """Random heads saved at ``path`` (with metadata ``extra``) with training counts that rank token t at
    ``(t * 37) % 97``."""
    counts = (np.arange(tiny.config.vocab_size) * 37) % tiny.config.vocab_size
    save_heads(random_heads(tiny, seed, 0.5), path, extra, token_counts=counts)
    return counts


def test_head_vocabulary_ranks_the_training_counts(tiny, tmp_path):
    counts = _heads_with_counts(tiny, tmp_path / "h")
    top = np.argsort(-counts)[:5]
    np.testing.assert_array_equal(head_vocabulary(tmp_path / "h", 5), np.sort(top))
    with_eos = head_vocabulary(tmp_path / "h", 5, always=(0,))  # token 0 is counted least: kept anyway
    np.testing.assert_array_equal(with_eos, np.sort([0, *top[:4]]))
    labels = np.array([[4, 1], [4, -1], [-1, 2], [7, 7]])
    data = Features(hidden=np.zeros((4, tiny.config.d_model), np.float32), labels=labels)
    np.testing.assert_array_equal(np.nonzero(label_counts(data, 10))[0], [4, 7])  # head 0's labels only
    assert label_counts(data, 10)[4] == 2 and label_counts(data, 10).sum() == 3


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.sampled_from(["chain-2", "tree-16"]), size=st.sampled_from([8, 40]),
       lens=st.lists(st.integers(1, 20), min_size=2, max_size=4), temperature=st.sampled_from([0.0, 0.9]))
def test_head_vocab_rows_equal_autoregressive(tiny_lm, tiny, tmp_path_factory, tree, size, lens, temperature):
    """Heads that propose only their ``head_vocab`` most trained-on tokens: still every row identical."""
    path = tmp_path_factory.mktemp("heads")
    _heads_with_counts(tiny, path)
    rng = np.random.default_rng(sum(lens))
    prompts = [rng.integers(0, 97, n).tolist() for n in lens]
    report = check(tiny_lm, prompts, "medusa", batch_size=len(prompts), heads=str(path), tree=tree, head_vocab=size,
                   max_new_tokens=16, temperature=temperature, top_k=20 if temperature else 0,
                   seed=list(range(len(lens))))
    assert report.counts["identical"] == len(prompts), report.table()


def test_head_vocab_proposes_only_its_tokens(tiny_lm, tiny):
    heads = random_heads(tiny, 5, 0.5)
    vocab = np.arange(10, 97, 7)
    proposer, params = medusa_proposer(tiny_lm, heads, load_spec("tree-16"), vocab)
    hidden = jax.random.normal(jax.random.key(3), (4, tiny.config.d_model))
    _, proposal = proposer.propose(params, hidden, None, None, "exact")
    assert np.isin(np.asarray(proposal.tokens), vocab).all()
    full, full_params = medusa_proposer(tiny_lm, heads, load_spec("tree-16"))
    _, unrestricted = full.propose(full_params, hidden, None, None, "exact")
    assert not np.isin(np.asarray(unrestricted.tokens), vocab).all()  # the restriction did something
    everything, all_params = medusa_proposer(tiny_lm, heads, load_spec("tree-16"), np.arange(97))
    np.testing.assert_array_equal(everything.propose(all_params, hidden, None, None, "exact")[1].tokens,
                                  unrestricted.tokens)


def test_head_vocab_bad_input(tiny_lm, tiny, tmp_path):
    heads = random_heads(tiny, 5, 0.5)
    with pytest.raises(ValueError, match="no training counts"):
        specdec.generate(tiny_lm, [1, 2], method="medusa", heads=heads, head_vocab=8)
    save_heads(heads, tmp_path / "plain")
    with pytest.raises(ValueError, match=f"no {TOKEN_COUNTS_FILE} in"):
        specdec.generate(tiny_lm, [1, 2], method="medusa", heads=str(tmp_path / "plain"), head_vocab=8)
    _heads_with_counts(tiny, tmp_path / "h")
    for bad, match in [(-1, "head_vocab .* integer in \\[0, 97\\]"), (98, "integer in \\[0, 97\\]"),
                       ([3, 3, 4], "distinct token ids in \\[0, 97\\)"), ([5, 200], "distinct token ids"),
                       ([[1, 2]], "list of token ids"), (1, "top 4 tokens but head_vocab has only 1")]:
        with pytest.raises(ValueError, match=match):
            specdec.generate(tiny_lm, [1, 2], method="medusa", heads=str(tmp_path / "h"), tree="tree-8",
                             head_vocab=bad)
    own = random_heads(tiny, 5, 0.5, shared_lm_head=False)
    with pytest.raises(ValueError, match="share the base LM head"):
        specdec.generate(tiny_lm, [1, 2], method="medusa", heads=own, head_vocab=[1, 2, 3])
    with pytest.raises(ValueError, match="token_counts must have shape"):
        save_heads(heads, tmp_path / "x", token_counts=np.ones(5))


def test_search_for_heads_measures_and_saves(tiny_lm, tiny, tmp_path):
    from heads.bundled import default_tree, default_trees
    from heads.tree_search import describe, search_for_heads

    heads = new_heads(tiny, base_name="tiny")
    save_heads(heads, tmp_path)
    topk = [[0.6, 0.7, 0.75], [0.4, 0.5, 0.55]]
    result = search_for_heads(tiny_lm, heads, tmp_path, max_nodes=6, topk=topk, save=True)
    assert 1 <= result["nodes"] <= 6 and result["heads_relative_cost_by_depth"][0] == 0
    assert all(c > 0 for c in result["heads_relative_cost_by_depth"][1:])
    assert set(result["target_cost_curve"]) == {"1", "2", "4", "7"}
    assert load_spec(default_tree(tmp_path)) == [tuple(p) for p in result["paths"]]
    assert default_trees(tmp_path) == default_tree(tmp_path)  # one batch size searched: one tree
    assert "best tree" in describe(result)
    with pytest.raises(ValueError, match="must include 1"):
        search_for_heads(tiny_lm, heads, tmp_path, max_nodes=6, topk=topk, rows=(2, 4))


def test_search_with_a_head_vocabulary_sets_the_default(tiny_lm, tiny, tmp_path):
    from heads.bundled import default_head_vocab
    from heads.tree_search import describe, search_for_heads

    _heads_with_counts(tiny, tmp_path)
    heads = load_heads(tmp_path, tiny)
    topk = [[0.6, 0.7, 0.75], [0.4, 0.5, 0.55]]
    assert default_head_vocab(tmp_path) is None
    result = search_for_heads(tiny_lm, heads, tmp_path, max_nodes=4, topk=topk, head_vocab=8, save=True)
    assert result["head_vocab"] == 8 and "head vocabulary: 8" in describe(result)
    assert default_head_vocab(tmp_path) == 8
    _, params = build_proposer("medusa", tiny_lm, {"heads": str(tmp_path)})
    np.testing.assert_array_equal(params["vocab"], head_vocabulary(tmp_path, 8))  # the default now
    assert params["table"].shape == (8, tiny.config.d_model)
    _, params = build_proposer("medusa", tiny_lm, {"heads": str(tmp_path), "head_vocab": 0})
    assert params["vocab"] is None and params["table"].shape == (97, tiny.config.d_model)  # 0: every token


def test_heads_trained_over_a_vocabulary_rank_it_by_default(tiny_lm, tiny, tmp_path):
    """Without a head vocabulary recorded by a search, heads trained with ``train_vocab=N`` decode and
    are searched over N tokens; a search's record, "every token" included, wins."""
    from heads.bundled import TREE_FILE, default_head_vocab
    from heads.tree_search import search_for_heads

    _heads_with_counts(tiny, tmp_path, extra={"training": {"config": {"train_vocab": 12}}})
    assert default_head_vocab(tmp_path) == 12
    _, params = build_proposer("medusa", tiny_lm, {"heads": str(tmp_path)})
    np.testing.assert_array_equal(params["vocab"], head_vocabulary(tmp_path, 12, tuple(tiny_lm.tokenizer.eos_ids)
                                                                   if tiny_lm.tokenizer else ()))
    _, params = build_proposer("medusa", tiny_lm, {"heads": str(tmp_path), "head_vocab": 0})
    assert params["vocab"] is None
    heads, topk = load_heads(tmp_path, tiny), [[0.6, 0.7, 0.75], [0.4, 0.5, 0.55]]
    assert search_for_heads(tiny_lm, heads, tmp_path, max_nodes=4, topk=topk)["head_vocab"] == 12
    search_for_heads(tiny_lm, heads, tmp_path, max_nodes=4, topk=topk, head_vocab=0, save=True)
    assert json.loads((tmp_path / TREE_FILE).read_text())["head_vocab"] == 0
    assert default_head_vocab(tmp_path) is None  # the search's "every token" wins over the training vocabulary


def test_search_tree_cli_rejects_a_bad_accuracy_file(tmp_path, capsys):
    from specdec.cli import main as cli_main

    (tmp_path / "tree.json").write_text(json.dumps({"paths": [[0]]}))
    assert cli_main(["search-tree", "--accuracy-from", str(tmp_path / "tree.json")]) == 2
    assert "records no heldout_topk_accuracy" in capsys.readouterr().err
    assert cli_main(["search-tree", "--accuracy-from", str(tmp_path / "missing.json")]) == 2
    assert "missing.json is missing" in capsys.readouterr().err
    (tmp_path / "tree.json").write_text(json.dumps({"heldout_topk_accuracy": [[0.5]], "head_vocab": 4096}))
    assert cli_main(["search-tree", "--accuracy-from", str(tmp_path / "tree.json")]) == 2
    assert "holds accuracies with head vocabulary 4096, not every token" in capsys.readouterr().err


def test_trees_searched_by_load_are_the_default_schedule(tiny_lm, tiny, tmp_path):
    """A tree.json with different trees per batch size makes method="medusa" pick them by running rows; a corrupt
    one is a clear error."""
    from heads.bundled import TREE_FILE, default_head_vocab, default_tree, default_trees
    from heads.tree_search import search_for_heads
    from specdec.engine import ByLoad

    heads = new_heads(tiny, base_name="tiny")
    save_heads(heads, tmp_path)
    result = search_for_heads(tiny_lm, heads, tmp_path, max_nodes=4, topk=[[0.6, 0.7], [0.4, 0.5]], rows=(1, 3))
    assert [load["rows"] for load in result["by_load"]] == [1, 3]
    assert result["paths"] == result["by_load"][0]["paths"]
    saved = {**result, "by_load": [{**result["by_load"][0], "paths": [[0], [1], [0, 0]]},
                                   {**result["by_load"][1], "rows": 3, "paths": [[0]]}]}
    (tmp_path / TREE_FILE).write_text(json.dumps(saved))
    assert default_trees(tmp_path) == {1: [[0], [1], [0, 0]], 3: [[0]]}
    assert isinstance(default_tree(tmp_path), str)
    sched, _ = build_proposer("medusa", tiny_lm, {"heads": str(tmp_path)})
    assert isinstance(sched, ByLoad) and [sched.pick(r).tree.size for r in (1, 2, 3, 8)] == [4, 4, 2, 2]
    (tmp_path / TREE_FILE).write_text('{"by_load": [')  # cut short: every default names the file and the fix
    for default in (default_tree, default_trees, default_head_vocab):
        with pytest.raises(ValueError, match="tree.json is corrupt.*specdec search-tree --save"):
            default(tmp_path)

"""A newcomer adds a method from outside the package, as docs/design.md ("Adding a method") shows: a
proposer, a spec registered under a new name, then generate, the equivalence checker and the CLI
know it, and it decodes exactly like autoregressive decoding."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import jax.numpy as jnp
import pytest

import specdec
from specdec import method_spec
from specdec.cli import build_parser
from specdec.engine import Commit, Proposal, View, no_proposal
from specdec.equivalence import check
from specdec.method_spec import Budgeted, build_by_load, option, register
from specdec.sampling import Sampling
from specdec.tree import Tree


@dataclass(frozen=True)
class RepeatProposer:
    """Guesses that the newest token repeats ``k`` times (right in runs of spaces or repeated words)."""

    k: int
    commits_any_path = True  # stateless

    @cached_property
    def tree(self) -> Tree:
        return Tree.chain(self.k)

    def prefill(self, params, tokens, prompt_lens, capacity, hidden=None):
        return None

    def propose(self, params, state, view: View, sampling: Sampling, rule: str):
        if self.k == 0:
            return state, no_proposal(view.last.shape[0])
        tokens = jnp.repeat(view.last[:, None], self.k, axis=1).astype(jnp.int32)
        return state, Proposal(tokens=tokens, draft_probs=None, confidence=jnp.full(tokens.shape, 0.5))

    def commit(self, params, state, commit: Commit):
        return state


@dataclass(frozen=True, kw_only=True)
class Repeat(Budgeted):
    """Repeat the newest token: a toy method."""

    name: ClassVar[str] = "repeat"
    summary: ClassVar[str] = "guesses that the newest token repeats"
    tuned: ClassVar[str] = "k"
    tune_choices: ClassVar[tuple] = (0, 2)
    k: int | dict = option(2, "tokens guessed per step", by_load=True)

    def build(self, target) -> tuple[Any, Any]:
        return build_by_load(lambda k: (RepeatProposer(k=k), None), self.budget, k=self.k)


@pytest.fixture
def repeat():
    register(Repeat)  # the one registration line
    yield Repeat
    del method_spec.REGISTRY["repeat"]


def test_a_method_registered_outside_the_package_decodes_exactly(tiny_lm, repeat):
    prompts = [[5, 5, 5, 9, 9, 9, 9], [1, 2, 3], [7, 7, 7, 7, 7]]
    alone = [specdec.generate(tiny_lm, p, max_new_tokens=16).tokens for p in prompts]
    assert [r.tokens for r in specdec.generate(tiny_lm, prompts, max_new_tokens=16, method=Repeat(k=3))] == alone
    pooled = specdec.generate(tiny_lm, prompts, max_new_tokens=16, slots=2, method="repeat", k={1: 3, 2: 1},
                              budget=2)
    assert [r.tokens for r in pooled] == alone
    report = check(tiny_lm, prompts, Repeat(k=2), max_new_tokens=16, temperature=0.8, seed=3)
    assert report.verdict == "identical" and report.method == "repeat"


def test_a_registered_method_gets_its_flags_and_clear_errors(tiny_lm, repeat, capsys):
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--method", "repeat", "--k", "1:3,4:1"])
    assert (args.method, args.k) == ("repeat", {1: 3, 4: 1})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--help"])
    assert "--method repeat: tokens guessed per step" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ValueError, match=r"method 'repeat' does not take option\(s\) \['heads'\]"):
        specdec.generate(tiny_lm, [1, 2], method="repeat", heads="x")
    with pytest.raises(ValueError, match="set them in the spec"):
        specdec.generate(tiny_lm, [1, 2], method=Repeat(), k=3)
    with pytest.raises(ValueError, match="registered already"):
        register(type("Repeat", (Repeat,), {"name": "repeat"}))

"""Continuous batching: many requests through a fixed number of batch rows ("slots").

The decode state (autoregressive or speculative) has one row per slot. A chunk
ends at the step in which a row finishes (``end_on_finish``), and between
on-device chunks the host harvests the rows that finished, prefills waiting
requests (one at a time: one compiled program per prompt-length bucket, no
padding rows) and scatters them into the free rows; no other row moves,
and every row keeps its own length, positions, budget and seed, so a request's
output does not depend on its slot, its neighbours or when it was admitted.
Once nothing waits, the batch shrinks to the next power of two that holds the
rows still running, so finished rows stop costing work (a shape change costs one
compilation per power of two, once).

While other rows run, an admitted prompt is prefilled in the same target forward
as one decode step of the running rows (``admit_autoregressive``,
``admit_speculative``; :func:`specdec.model.forward_together`): the matrix
products run once over the step's few tokens per row and the prompt's, so where
a decode step's products are far from compute-bound (a CPU) the pair costs less
than the two apart.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdec.autoregressive import DecodeState, prefilled, prompt_segment, step_segment, stepped
from specdec.engine import SpecState, propose_part, spec_state, verified, verify_segment, whole_number
from specdec.model import forward_together
from specdec.sampling import Sampling


@jax.jit
def take_rows(state, rows: jax.Array):
    """The decode state restricted to batch ``rows: [R]`` (every array's leading axis; scalars are
    shared counters and kept)."""
    return jax.tree.map(lambda x: x[rows] if jnp.ndim(x) else x, state)


@functools.partial(jax.jit, donate_argnums=0)
def put_rows(state, rows: jax.Array, new):
    """Write the rows of decode state ``new`` (batch R) into ``state`` at batch rows ``rows: [R]``;
    an index past the batch drops that row of ``new``. Scalars keep ``state``'s value."""
    return jax.tree.map(lambda x, y: x.at[rows].set(y, mode="drop") if jnp.ndim(x) else x, state, new)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "width"), donate_argnames=("st",))
def admit_autoregressive(graphdef, params, st: DecodeState, tokens: jax.Array, prompt_lens: jax.Array,
                         max_new: jax.Array, seeds: jax.Array, *, sampling: Sampling, eos_ids: tuple[int, ...],
                         width: int = 1) -> tuple[DecodeState, DecodeState]:
    """One autoregressive step of ``st``'s running rows (as :func:`specdec.autoregressive.decode_chunk`'s)
    with the padded prompt ``tokens: [1, P]`` (length, budget, seed: ``[1]`` each) prefilled in the
    same forward. Returns the stepped state and the prompt's 1-row state, for :func:`put_rows` into a
    finished row (a separate program: inside this one the scatter copied the whole batch state)."""
    model = nnx.merge(graphdef, params)
    res, pre = forward_together(model, [step_segment(st, width),
                                        prompt_segment(model.config, tokens, prompt_lens, st.cache.capacity)])
    new, _ = prefilled(model, pre, prompt_lens, max_new, seeds, out=st.out.shape[1], sampling=sampling,
                       eos_ids=eos_ids)
    return stepped(st, res, sampling, eos_ids), new


@functools.partial(jax.jit, static_argnames=("graphdef", "proposer", "sampling", "rule", "eos_ids"),
                   donate_argnames=("st",))
def admit_speculative(graphdef, params, proposer, pparams, st: SpecState, tokens: jax.Array, prompt_lens: jax.Array,
                      max_new: jax.Array, seeds: jax.Array, *, sampling: Sampling, rule: str,
                      eos_ids: tuple[int, ...]) -> tuple[SpecState, SpecState]:
    """One speculative step of ``st``'s running rows (as :func:`specdec.engine.spec_chunk`'s) with the
    padded prompt ``tokens: [1, P]`` prefilled, target and proposer, its target forward riding in the
    step's; returns both states as :func:`admit_autoregressive`. ``proposer`` must verify from the
    target's first layer."""
    model = nnx.merge(graphdef, params)
    pstate, prop = propose_part(graphdef, params, proposer, pparams, st, sampling, rule)
    seg = verify_segment(proposer.tree, st.dec, prop)
    res, pre = forward_together(model, [seg, prompt_segment(model.config, tokens, prompt_lens, st.dec.cache.capacity)])
    dec, hidden = prefilled(model, pre, prompt_lens, max_new, seeds, out=st.dec.out.shape[1], sampling=sampling,
                            eos_ids=eos_ids)
    new = spec_state(proposer, pparams, dec, hidden, tokens, prompt_lens, st.accepted_hist.shape[1] - 1)
    return verified(proposer, pparams, st, pstate, prop, seg.tokens, res, sampling, rule, eos_ids), new


class Requests(Protocol):
    """What the pool needs from the caller (``specdec.api``'s run set-up)."""

    n: int  # number of requests

    merge_admissions: bool  # admit requests with ``admit`` while rows run (else prefill them alone)

    def start(self, requests: list[int]) -> Iterator:
        """A decode generator over these requests: its first item is their prefilled state, and it
        runs one chunk on each state sent to it (ending when every row is done)."""

    def admit(self, state, slot: int, request: int, running: int) -> Any:
        """``state`` after one step of its ``running`` rows with ``request`` prefilled into batch row
        ``slot`` in the same forward (``admit_autoregressive`` / ``admit_speculative``)."""

    def apply_stops(self, state, slot_requests: list[int | None]) -> Any:
        """The state with rows marked done whose request produced a stop string."""

    def harvest(self, state, slot: int, request: int) -> int:
        """Record the finished ``request`` from batch row ``slot``; returns the target forwards it took part in."""


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class SlotUse:
    """Per-slot work: target forwards in which each slot held a running request; and the prompts'
    prefills (the first rows together, then one per admitted request: alone, or with one decode
    step of the running rows when admissions merge), each waited for."""

    busy: list[int] = field(default_factory=list)
    forwards: int = 0  # target forwards of the pool (all slots step together)
    prefills: int = 0  # prefill calls
    prefill_s: float = 0.0  # their wall time (a merged admission's step included)

    def prefilled(self, run: Callable[[], Any]):
        """``run()``, a prefilled state, timed as a prefill."""
        start = time.perf_counter()
        state = jax.block_until_ready(run())
        self.prefill_s += time.perf_counter() - start
        self.prefills += 1
        return state

    @property
    def utilisation(self) -> list[float]:
        return [b / self.forwards if self.forwards else 0.0 for b in self.busy]


def dec_of(state):
    """The ``DecodeState`` inside an autoregressive or speculative state."""
    return getattr(state, "dec", state)


def pool_states(requests: Requests, slots: int, use: SlotUse, *, shrink: bool = True) -> Iterator[tuple]:
    """Decode every request with at most ``slots`` rows on device, admitting waiting requests into
    rows freed between chunks. Yields ``(state, slot_requests)`` after prefill and after every chunk
    (``slot_requests[row]``: the request in that batch row, or None); fills ``use`` as it goes."""
    slots = whole_number(slots, "slots", 1)
    waiting = list(range(requests.n))
    rows: list[int | None] = waiting[:slots]
    del waiting[:slots]
    slot_of_row = list(range(len(rows)))  # logical slot of each batch row (rows move when the batch shrinks)
    use.busy[:] = [0] * len(rows)
    gen = requests.start(rows)
    state = use.prefilled(lambda: next(gen))
    while True:
        yield state, rows
        state = requests.apply_stops(state, rows)
        done = np.asarray(dec_of(state).done)
        for i, r in enumerate(rows):
            if r is not None and done[i]:
                use.busy[slot_of_row[i]] += requests.harvest(state, i, r)
                rows[i] = None
        free = [i for i, r in enumerate(rows) if r is None]
        for i, r in zip(free, waiting):  # one prefill per request: one program per prompt bucket, no padding
            running = sum(x is not None for x in rows)
            if requests.merge_admissions and running:
                state = use.prefilled(lambda: requests.admit(state, i, r, running))
            else:
                state = put_rows(state, jnp.asarray([i], jnp.int32), use.prefilled(lambda: next(requests.start([r]))))
            rows[i] = r
        del waiting[:len(free)]
        running = [i for i, r in enumerate(rows) if r is not None]
        use.forwards = int(dec_of(state).forwards)
        if not running:
            return
        ended = np.asarray(dec_of(state).done)[running]
        if ended.all() or (waiting and ended.any()):
            continue  # requests ended at their prefill (budget 1, EOS first) or in a merged admission's step
        width = next_power_of_two(len(running))
        if shrink and not waiting and width <= len(rows) // 2:
            keep = running + [i for i, r in enumerate(rows) if r is None][:width - len(running)]
            state = take_rows(state, jnp.asarray(keep, jnp.int32))
            rows = [rows[i] for i in keep]
            slot_of_row = [slot_of_row[i] for i in keep]
        try:
            state = gen.send(state)
        except StopIteration:  # cannot happen while a row runs; kept for a clear failure
            raise RuntimeError("the decode loop ended with requests still running") from None

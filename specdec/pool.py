"""Continuous batching: many requests through a fixed number of batch rows ("slots").

The decode state (autoregressive or speculative) has one row per slot. A chunk
ends at the step in which a row finishes (``end_on_finish``), and between
on-device chunks the host harvests the rows that finished, prefills waiting
requests (one at a time: one compiled prefill per prompt-length bucket, no
padding rows) and scatters them into the free rows; no other row moves,
and every row keeps its own length, positions, budget and seed, so a request's
output does not depend on its slot, its neighbours or when it was admitted.
Once nothing waits, the batch shrinks to the next power of two that holds the
rows still running, so finished rows stop costing work (a shape change costs one
compilation per power of two, once).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from specdec.engine import whole_number


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


class Requests(Protocol):
    """What the pool needs from the caller (``specdec.api``'s run set-up)."""

    n: int  # number of requests

    def start(self, requests: list[int]) -> Iterator:
        """A decode generator over these requests: its first item is their prefilled state, and it
        runs one chunk on each state sent to it (ending when every row is done)."""

    def apply_stops(self, state, slot_requests: list[int | None]) -> Any:
        """The state with rows marked done whose request produced a stop string."""

    def harvest(self, state, slot: int, request: int) -> int:
        """Record the finished ``request`` from batch row ``slot``; returns the target forwards it took part in."""


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class SlotUse:
    """Per-slot work: target forwards in which each slot held a running request; and the prompts'
    prefills (the first rows together, then one per admitted request), each waited for."""

    busy: list[int] = field(default_factory=list)
    forwards: int = 0  # target forwards of the pool (all slots step together)
    prefills: int = 0  # prefill calls
    prefill_s: float = 0.0  # their wall time

    def prefilled(self, gen: Iterator):
        """The first item of decode generator ``gen`` (its prefilled state), timed as a prefill."""
        start = time.perf_counter()
        state = jax.block_until_ready(next(gen))
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
    state = use.prefilled(gen)
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
            state = put_rows(state, jnp.asarray([i], jnp.int32), use.prefilled(requests.start([r])))
            rows[i] = r
        del waiting[:len(free)]
        running = [i for i, r in enumerate(rows) if r is not None]
        use.forwards = int(dec_of(state).forwards)
        if not running:
            return
        if np.asarray(dec_of(state).done)[running].all():
            continue  # every running request ended at its prefill (budget 1, EOS first): harvest, admit more
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

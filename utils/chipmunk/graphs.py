"""Chipmunk's layers as a participant of the step's CUDA graphs (utils/step_graphs.py).

A replayed graph runs no Python, so one recorded step would be repeated whatever Chipmunk's schedule says. But every
Chipmunk layer decides from the step index and the last step it computed: attention dense or sparse (and whether it
selects a new key set), MLP dense, sparse with a new neuron selection, or sparse. Without feature caching the last
computed step is the previous one; with it, the last full step (a forecast step computes no layer). So the layers'
decisions at a step are its kind, and each kind is recorded once and replayed at its later occurrences.

How the parts fit (docs/DESIGN.md, "CUDA-graphing Chipmunk's steps", has the traps):
  * the caches are persistent buffers written in place (layers.SparseLayer.write), so every graph reads and writes
    the same memory whichever kind ran before;
  * before every eager or captured run the layers' `last_step` is set to the last computed step, so their Python
    takes the decisions the kind names; after a replay the layers' Python state (last step, flags, counts) is booked
    from a snapshot taken at capture;
  * the MLP's random neurons are hashed from (layer, step) with the step read from a device tensor
    (StepClock.step_tensor) that the graphs' wrapper fills before each call, so replays draw the neurons an eager run
    would;
  * the token reorder hooks run around the recorded forward, eagerly (a few index kernels per step).
"""

from __future__ import annotations

from typing import Any


class ChipmunkStepKinds:
    """StepKinds for a transformer's Chipmunk layers; `cache`: the feature cache that decides which steps compute,
    or None (every step does)."""

    def __init__(self, layers: list, cache=None):
        if not layers:
            raise RuntimeError("Chipmunk's step graphs: the config leaves no sparse layer (attn and mlp both disabled)")
        self.layers, self.cache, self.clock = layers, cache, layers[0].clock
        self.before: list[dict[str, int]] = []

    def _computes(self) -> bool:
        return self.cache is None or self.cache.full

    def _last_computed(self, step: int) -> int | None:
        if self.cache is not None:
            return self.cache.last_full  # begin_step ran: the last full step before this one (None: a new generation)
        return step - 1 if step > 0 else None

    def kind(self, step: int) -> Any:
        if not self._computes():
            return None  # a forecast step calls no Chipmunk layer
        last = self._last_computed(step)
        return tuple(layer.decide(step, last) for layer in self.layers)

    def eager_now(self) -> bool:
        return False

    def prepare(self, step: int) -> None:
        if not self._computes():
            return
        last = self._last_computed(step)
        for layer in self.layers:  # replays did not update last_step
            layer.last_step = last
        self.before = [dict(layer.stats) for layer in self.layers]

    def captured(self) -> Any:
        """What the layers' Python did while capturing: every replay of this kind stands for it."""
        if not self._computes():
            return None
        return [(dict(layer.flags), {k: n - before[k] for k, n in layer.stats.items()})
                for layer, before in zip(self.layers, self.before)]

    def replayed(self, step: int, state: Any) -> None:
        if state is None:
            return
        for layer, (flags, stats) in zip(self.layers, state):
            layer.flags, layer.last_step = dict(flags), step
            for name, n in stats.items():
                layer.stats[name] += n

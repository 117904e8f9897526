"""CUDA graphs for a Chipmunk transformer: one graph per (input shapes, step kind), the stack's last layer when
Chipmunk is on and `--compile_mode reduce-overhead` (or max-autotune) asks for CUDA graphs.

Why not inductor's CUDA graph trees: Chipmunk decides per step in Python (inside opaque custom ops), and a replayed
graph runs no Python, so one recorded step would be repeated whatever the schedule says. But without feature
caching every Chipmunk layer takes the same decisions at a given step, and those decisions are a function of the
step index alone (`step_kind`): attention dense or sparse (and whether it reselects its key set), MLP dense,
sparse with a new neuron selection, or sparse. So each kind is recorded once and replayed at the kind's later steps.

How the parts fit (docs/DESIGN.md, "CUDA-graphing Chipmunk's steps", has the traps):
  * the first occurrence of a kind runs eagerly (Triton autotuning, cuBLAS workspaces, the caches' first
    allocation), the second is captured and then replayed, later ones replay;
  * the caches are persistent buffers written in place (layers.SparseLayer.write), so every graph reads and writes
    the same memory whichever kind ran before; a new input shape reallocates them, so the graphs of the old shape
    are dropped;
  * before every eager or captured call the layers' `last_step` is set to step - 1, so their Python takes the plain
    schedule's decisions, the ones `step_kind` names; after a replay the wrapper records what the layers' Python
    would have (last step, flags, stats), from a snapshot taken at capture;
  * the MLP's random neurons are hashed from (layer, step) with the step read from a device tensor
    (StepClock.step_tensor) that the wrapper updates before each call, so replays draw the same neurons an eager
    run would;
  * inputs are copied into static buffers; outputs are cloned, so that all graphs can share one memory pool;
  * the token reorder hooks run around this forward, eagerly (a few index kernels per step).
"""

from __future__ import annotations

from typing import Callable

import torch

from utils import compile_utils
from utils.chipmunk.config import ChipmunkConfig, step_kind


class ChipmunkStepGraphs:
    """`forward(**tensors)` (the transformer's own forward with return_dict=False), recorded per step kind."""

    def __init__(self, forward: Callable, layers: list, config: ChipmunkConfig, clock, device: torch.device):
        self.forward, self.layers, self.config, self.clock = forward, layers, config, clock
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple] = {}
        self.shapes: tuple | None = None  # the input shapes the graphs were recorded for
        self.pool = torch.cuda.graph_pool_handle()
        self.calls = {"eager": 0, "captured": 0, "replayed": 0}
        clock.step_tensor = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, **tensors: torch.Tensor):
        step = self.clock.step
        self.clock.step_tensor.fill_(step)
        shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))
        if shapes != self.shapes:  # the layers reallocate their caches: graphs of other shapes hold freed memory
            self.shapes, self.seen, self.graphs = shapes, {}, {}
        key = (shapes, step_kind(step, self.config))
        if key in self.graphs:
            graph, static_in, static_out, after = self.graphs[key]
            for k, v in tensors.items():
                static_in[k].copy_(v)
            graph.replay()
            self._replayed(step, after)
            self.calls["replayed"] += 1
            return tuple(t.clone() for t in static_out)
        for layer in self.layers:  # decide as the plain schedule does (replays did not update last_step)
            layer.last_step = step - 1 if step > 0 else None
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] == 1:
            self.calls["eager"] += 1
            return self.forward(**tensors)
        static_in = {k: v.clone() for k, v in tensors.items()}
        stats_before = [dict(layer.stats) for layer in self.layers]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.forward(**static_in)
        # What the layers' Python did while capturing is what every replay of this kind stands for.
        after = [(dict(layer.flags), {k: n - before[k] for k, n in layer.stats.items()})
                 for layer, before in zip(self.layers, stats_before)]
        self.graphs[key] = (graph, static_in, static_out, after)
        graph.replay()  # capturing recorded the kernels without running them
        self.calls["captured"] += 1
        return tuple(t.clone() for t in static_out)

    def uncaptured_kinds(self) -> int:
        """Kinds seen once and not yet recorded: their next occurrence is captured, which costs that step a capture.
        A kind that occurs once per generation (step 1's, with Chipmunk's published schedule) is therefore captured
        during the second generation, so a benchmark must warm up until this is 0 (run_benchmark.warm_up)."""
        return sum(1 for key in self.seen if key not in self.graphs)

    def _replayed(self, step: int, after: list) -> None:
        for layer, (flags, stats) in zip(self.layers, after):
            layer.flags, layer.last_step = dict(flags), step
            for name, n in stats.items():
                layer.stats[name] += n


def install_step_graphs(pipeline) -> str:
    """Route the Chipmunk transformer's forward through ChipmunkStepGraphs (after compile). Returns the status."""
    transformer = pipeline.transformer
    if transformer.device.type != "cuda":
        raise RuntimeError("Chipmunk's step graphs need a CUDA device")
    layers, config = transformer.chipmunk_layers, transformer.chipmunk_config
    if not layers:
        raise RuntimeError("Chipmunk's step graphs: the config leaves no sparse layer (attn and mlp both disabled)")
    graphs = ChipmunkStepGraphs(compile_utils.tensor_forward(transformer), layers, config, layers[0].clock,
                                transformer.device)
    compile_utils.install_compiled_forward(transformer, graphs, what="Chipmunk's step graphs")
    transformer.chipmunk_step_graphs = graphs
    return f"CUDA graphs per Chipmunk step kind ({len(layers)} sparse layers)"

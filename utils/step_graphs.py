"""The transformer's step as CUDA graphs: one graph per (input shapes, step kind), replayed with the inputs copied in;
and the text encoders' forward, one graph per prompt shape (EncoderGraphs).

`--compile_mode reduce-overhead` compiles the blocks without inductor's CUDA graph trees and records the whole forward
instead (glue and blocks): no host work per step. A replayed graph runs no Python, so it repeats whatever the recorded
step decided. Layers that decide per step (Chipmunk's sparse layers, feature caching's schedule) decide from the step
index alone, so each takes part with a *step kind*: a name for everything its kernels depend on besides the inputs and
the persistent buffers they read and write. The dense stack has one kind.

A kind's first occurrence runs eagerly (Triton autotuning, cuBLAS workspaces, the buffers' first allocation), its
second is captured, later ones replay. A participant (`StepKinds`) says, for each step:
  kind(step)              what it will do (computed before the forward runs);
  eager_now()             whether this step must run eagerly, outside any graph (a FLOP count);
  prepare(step)           before an eager or captured run: make its Python take the decisions `kind` named;
  captured() -> state     after a capture: what its Python did, which every replay of this kind stands for;
  replayed(step, state)   after a replay: book it.
Whatever reads the step on the device (Chipmunk's random neurons) reads `clock.step_tensor`, which this wrapper
fills before every call. Inputs are copied into static buffers and outputs cloned, so that all graphs share one
memory pool; a new input shape drops the graphs (the participants reallocate their buffers).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from utils import compile_utils


class StepKinds(Protocol):
    def kind(self, step: int) -> Any: ...
    def eager_now(self) -> bool: ...
    def prepare(self, step: int) -> None: ...
    def captured(self) -> Any: ...
    def replayed(self, step: int, state: Any) -> None: ...


class StepGraphs:
    """`forward(**tensors)` (the transformer's forward of its tensors, return_dict=False), recorded per step kind."""

    def __init__(self, forward: Callable, participants: list[StepKinds], clock, device: torch.device):
        self.forward, self.participants, self.clock = forward, participants, clock
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple] = {}
        self.shapes: tuple | None = None  # the input shapes the graphs were recorded for
        self.pool = torch.cuda.graph_pool_handle()
        self.calls = {"eager": 0, "captured": 0, "replayed": 0}
        if clock is not None:
            clock.step_tensor = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, **tensors: torch.Tensor):
        """`tensors`: the forward's tensors, and any non-tensor input (Qwen-Image's `img_shapes`), which is part of a
        graph's key by value and handed to the recorded forward as it is."""
        step = self.clock.step if self.clock is not None else 0
        if self.clock is not None:
            self.clock.step_tensor.fill_(step)
        shapes = tuple((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                       for k, v in sorted(tensors.items()))
        if shapes != self.shapes:  # buffers of another shape are reallocated: its graphs would hold freed memory
            self.shapes, self.seen, self.graphs = shapes, {}, {}
        if any(p.eager_now() for p in self.participants):
            for participant in self.participants:
                participant.prepare(step)
            self.calls["eager"] += 1
            return self.forward(**tensors)
        key = (shapes, tuple(p.kind(step) for p in self.participants))
        if key in self.graphs:
            graph, static_in, static_out, states = self.graphs[key]
            for k, v in tensors.items():
                if isinstance(v, torch.Tensor):
                    static_in[k].copy_(v)
            graph.replay()
            for participant, state in zip(self.participants, states):
                participant.replayed(step, state)
            self.calls["replayed"] += 1
            return tuple(t.clone() for t in static_out)
        for participant in self.participants:
            participant.prepare(step)
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] == 1:
            self.calls["eager"] += 1
            return self.forward(**tensors)
        static_in = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
        graph, static_out = self._record(static_in)
        self.graphs[key] = (graph, static_in, static_out, [p.captured() for p in self.participants])
        graph.replay()  # capturing recorded the kernels without running them
        self.calls["captured"] += 1
        return tuple(t.clone() for t in static_out)

    def _record(self, static_in: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        """(a CUDA graph of the forward on the static inputs, its static outputs)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.forward(**static_in)
        return graph, static_out

    def uncaptured_kinds(self) -> int:
        """Kinds seen once and not yet recorded: their next occurrence is captured, which costs that step a capture.
        A kind that occurs once per generation (step 1's, with Chipmunk's published schedule) is therefore captured
        during the second generation, so a benchmark warms up until this is 0 (run_benchmark.warm_up)."""
        return sum(1 for key in self.seen if key not in self.graphs)


def participants_of(transformer: torch.nn.Module) -> tuple[list[StepKinds], Any, str]:
    """The step-dependent layers the stack attached, as participants: feature caching's schedule (which refuses its
    data-dependent modes, with the reason) and Chipmunk's layers; the clock they read the step from; a description."""
    participants, clock, parts = [], None, []
    cache = getattr(transformer, "harness_cache", None)
    if cache is not None:
        participants.append(cache.graph_kinds())
        clock = cache.clock
        parts.append(f"{cache.mode} step kinds")
    if getattr(transformer, "chipmunk_layers", None):
        from utils.chipmunk.graphs import ChipmunkStepKinds

        kinds = ChipmunkStepKinds(transformer.chipmunk_layers, cache)
        participants.append(kinds)
        clock = clock or kinds.clock
        parts.append(f"Chipmunk step kinds ({len(transformer.chipmunk_layers)} sparse layers)")
    return participants, clock, " x ".join(parts)


def install_step_graphs(transformer: torch.nn.Module) -> str:
    """Route the (compiled) transformer's forward through StepGraphs, with the participants the stack attached.
    Regional compile alone leaves ~1,300 kernel launches, 57 compiled-region calls and the eager glue to the host
    each step: on the H200 host a float8 step with 78 ms of kernels took 111 ms. Returns the stack's status line."""
    if transformer.device.type != "cuda":
        raise RuntimeError("CUDA graphs of the step need a CUDA device")
    participants, clock, described = participants_of(transformer)
    graphs = StepGraphs(compile_utils.tensor_forward(transformer), participants, clock, transformer.device)
    compile_utils.install_compiled_forward(transformer, graphs, what="the step's CUDA graphs")
    transformer.step_graphs = graphs
    if not participants:
        return "the whole forward as one CUDA graph per input shape"
    return f"one CUDA graph of the whole forward per input shape and {described}"


class EncoderGraphs:
    """A text encoder's forward as FLUX's pipelines call it (the token ids, `output_hidden_states=False`) through
    StepGraphs of the ids: one CUDA graph per prompt shape, recorded at its second call and replayed after, its
    outputs handed back as the model's output class. Compiled layer by layer, the T5-XXL encoder is still 24 compiled
    regions, their guards and the glue between them, called from Python; replayed, it is one launch, and the host is
    free while the device encodes (the pipeline draws the initial noise next, on the host). Any other call (masks,
    hidden states wanted) runs eagerly."""

    def __init__(self, model: torch.nn.Module):
        self.eager_forward = model.forward
        self.output: tuple[type, list[str]] | None = None  # the output's class and fields, from the recorded run
        self.graphs = StepGraphs(self._outputs, [], None, model.device)

    def _outputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.eager_forward(input_ids, output_hidden_states=False)
        self.output = type(out), list(out.keys())  # ModelOutput: the fields that are set
        return tuple(out.values())

    def __call__(self, input_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None, **kwargs):
        if input_ids is None or output_hidden_states or any(v is not None for v in kwargs.values()):
            return self.eager_forward(input_ids, output_hidden_states=output_hidden_states, **kwargs)
        tensors = self.graphs(input_ids=input_ids)
        cls, fields = self.output
        return cls(**dict(zip(fields, tensors)))


def install_encoder_graphs(model: torch.nn.Module) -> None:
    """Route `model`'s forward through EncoderGraphs (a CUDA model)."""
    if model.device.type != "cuda":
        raise RuntimeError("CUDA graphs of a text encoder need a CUDA device")
    model.forward = EncoderGraphs(model)


def pipeline_graphs(pipeline) -> list[StepGraphs]:
    """Every StepGraphs the stack installed on `pipeline`: the transformer's step, the text encoders'."""
    graphs = [getattr(getattr(pipeline, "transformer", None), "step_graphs", None)]
    graphs += [model.forward.graphs for model in compile_utils.flux_text_encoders(pipeline)
               if isinstance(model.forward, EncoderGraphs)]
    return [g for g in graphs if g is not None]

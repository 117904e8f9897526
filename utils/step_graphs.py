"""The transformer's step as CUDA graphs: one graph per (input shapes, step kind), replayed with the inputs copied in;
and the text encoders' layers, one graph per prompt shape (EncoderLayerGraphs).

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


class EncoderLayerGraphs(torch.nn.Module):
    """A text encoder's repeated layers as one call, recorded as a CUDA graph per input shape (StepGraphs with no
    participants: the first call of a shape runs eagerly, the second is captured, later ones replay). Installed as
    the only element of the encoder's layer list, so the encoder's own loop calls it once with the first layer's
    arguments; the glue around the layers (embeddings, masks, final norm, CLIP's pooling) stays eager, outside the
    graph. Recording the layers rather than the model: transformers' glue asks `is_tracing()`, which counts a
    capturing stream, and takes other paths there (a mask it skips eagerly is built while capturing), so a recorded
    glue would call the compiled layers with other inputs than their eager call and compile them during the capture.

    `t5`: T5's layer protocol (hidden states, mask, position bias, cross-attention inputs; returns the hidden states
    and the position bias the first layer computed, which the others take) rather than CLIP's (hidden states, mask,
    `is_causal`; returns the hidden states). The layers are called exactly as the encoder's loop calls them, so the
    compiled layers match the guards of their earlier calls and nothing recompiles."""

    def __init__(self, layers: torch.nn.ModuleList, t5: bool, device: torch.device):
        super().__init__()
        self.layers, self.t5 = layers, t5
        self.graphs = StepGraphs(self._run, [], None, device)

    def _run(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, position_bias=None,
             **kwargs) -> tuple[torch.Tensor]:
        """The layers as the encoder's loop calls them (T5: the first layer's position bias handed on)."""
        for layer in self.layers:
            if self.t5:
                hidden_states, position_bias, _ = layer(hidden_states, attention_mask, position_bias, None, None,
                                                        None, past_key_values=None, **kwargs)
            else:
                hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return (hidden_states,)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        """The encoder's loop calls this once, as its first layer; T5's answer leaves the position bias out (None):
        the loop only hands it to the next layer, and there is none. Eager (the layers one by one, in this call)
        when a hook watches a layer (transformers records hidden states so, and a replay runs no hook) or a
        position bias is given; cross-attention inputs and a cache (never in an encoder-only FLUX encoder) are
        refused."""
        cache = kwargs.pop("past_key_values", None)  # T5's loop passes None
        if cache is not None or any(a is not None for a in args[1:]):
            raise NotImplementedError("EncoderLayerGraphs holds T5's encoder layers: no cross-attention, no cache")
        watched = any(layer._forward_hooks or layer._forward_pre_hooks for layer in self.layers)
        if watched or any(a is not None for a in args):
            out = self._run(hidden_states, attention_mask, *args[:1], **kwargs)[0]
        else:
            out = self.graphs(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)[0]
        return (out, None, None) if self.t5 else out


def install_encoder_graphs(model: torch.nn.Module) -> None:
    """Put EncoderLayerGraphs in place of `model`'s (compiled) layer list (a CUDA model, FLUX's CLIP or T5)."""
    if model.device.type != "cuda":
        raise RuntimeError("CUDA graphs of a text encoder need a CUDA device")
    owner, attribute = compile_utils.text_encoder_layer_owner(model)
    stack = EncoderLayerGraphs(getattr(owner, attribute), type(model).__name__ == "T5EncoderModel", model.device)
    setattr(owner, attribute, torch.nn.ModuleList([stack]))


def encoder_graphs(model: torch.nn.Module) -> StepGraphs | None:
    """The StepGraphs install_encoder_graphs put in `model`, if any."""
    layers = compile_utils.text_encoder_layers(model)
    return layers[0].graphs if len(layers) == 1 and isinstance(layers[0], EncoderLayerGraphs) else None


def pipeline_graphs(pipeline) -> list[StepGraphs]:
    """Every StepGraphs the stack installed on `pipeline`: the transformer's step, the text encoders'."""
    graphs = [getattr(getattr(pipeline, "transformer", None), "step_graphs", None)]
    graphs += [encoder_graphs(model) for model in compile_utils.flux_text_encoders(pipeline)]
    return [g for g in graphs if g is not None]

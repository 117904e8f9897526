"""Chipmunk's step graphs (utils/chipmunk_graphs.py) on CPU: the invariants the CUDA graphs rest on, checked on the
tiny pipeline, and the wrapper's bookkeeping with a stand-in for torch.cuda.graph. Capture and replay themselves
need a GPU: scripts/h100_chipmunk.py --parts graphs compares graphed and eager latents there."""

from pathlib import Path

import pytest
import torch

from utils import chipmunk, chipmunk_graphs, compile_utils
from utils.benchmark_utils import pipeline_call_kwargs
from utils.pipeline_utils import load_pipeline, optimize, validate_args

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs/chipmunk-tiny.yml")


def _chipmunk_pipe(make_args, steps):
    args = make_args("--disable_bf16", "--num_inference_steps", str(steps), "--chipmunk_config", TINY_CONFIG)
    validate_args(args)
    pipe = optimize(load_pipeline(args), args)
    return pipe, args


def _generate(pipe, args, steps=None):
    kwargs = pipeline_call_kwargs(args)
    if steps:
        kwargs["num_inference_steps"] = steps
    return pipe(**kwargs, generator=torch.manual_seed(0), output_type="latent").images


def _decisions(layer, before, after):
    d = {k: after[k] - before[k] for k in after}
    if isinstance(layer, chipmunk.SparseAttentionLayer):
        return ("attn", d["dense"] == 1)
    return ("mlp", d["dense"] == 1, d["reselect"] == 1)


def test_step_kind_names_what_every_layer_decides_at_each_step(make_args):
    """The graphs are keyed by step_kind: it must equal each layer's own decision at every step of plain runs."""
    steps = 11  # tiny config: attention dense 0,1,4,8; MLP dense 0,4,8, reselect 1,3,5,7,9
    pipe, args = _chipmunk_pipe(make_args, steps)
    layers = pipe.transformer.chipmunk_layers
    assert len(layers) == 10
    seen = []

    def record(module, args_, kwargs):
        seen.append([dict(layer.state.stats) for layer in layers])

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    _generate(pipe, args)
    seen.append([dict(layer.state.stats) for layer in layers])
    config = pipe.transformer.chipmunk_config
    for step in range(steps):
        attn_dense, _, mlp_dense, mlp_reselect = chipmunk_graphs.step_kind(step, config)
        for layer, before, after in zip(layers, seen[step], seen[step + 1]):
            expected = ("attn", attn_dense) if isinstance(layer, chipmunk.SparseAttentionLayer) else \
                ("mlp", mlp_dense, mlp_reselect)
            assert _decisions(layer, before, after) == expected, (step, layer.state.name)
    assert [chipmunk_graphs.step_kind(t, config)[2] for t in range(steps)] == [t in (0, 4, 8) for t in range(steps)]


def test_step_kind_selects_keys_once_per_generation_without_recompute_mask():
    config = chipmunk.ChipmunkConfig()
    config.attn.recompute_mask = False
    kinds = [chipmunk_graphs.step_kind(t, config) for t in range(21)]
    assert [t for t, k in enumerate(kinds) if k[0]] == [0, 1, 10, 20]
    assert [t for t, k in enumerate(kinds) if k[1]] == [0]  # a step-0 graph differs from a step-10 one


def test_caches_are_written_in_place_across_steps_and_generations(make_args):
    """A CUDA graph records addresses: every cache must stay the same tensor once allocated, a new generation
    included (a re-bound cache would leave the graphs reading memory nothing writes)."""
    pipe, args = _chipmunk_pipe(make_args, 3)
    _generate(pipe, args)  # steps 0 (dense), 1 (reselect), 2: every cache exists
    layers = pipe.transformer.chipmunk_layers
    addresses = [{name: t.data_ptr() for name, t in layer.state.tensors.items()} for layer in layers]
    assert all(addresses) and "neuron_index" in addresses[-1] and "o_cache" in addresses[0]
    _generate(pipe, args, steps=9)  # dense refreshes at 4 and 8, reselections, a new generation's reset
    assert [{name: t.data_ptr() for name, t in layer.state.tensors.items()} for layer in layers] == addresses


def test_random_neurons_are_a_hash_of_layer_and_step():
    a = chipmunk.hashed_uniform((4, 300), 17, "cpu")
    assert torch.equal(a, chipmunk.hashed_uniform((4, 300), torch.tensor(17), "cpu"))  # int or tensor seed
    assert not torch.equal(a, chipmunk.hashed_uniform((4, 300), 18, "cpu"))
    x = chipmunk.hashed_uniform((100_000,), torch.randint(0, 2**40, ()).item(), "cpu")
    assert 0 <= float(x.min()) and float(x.max()) < 1
    assert abs(float(x.mean()) - 0.5) < 0.01 and abs(float(x.var()) - 1 / 12) < 0.003
    assert torch.histc(x, 10, 0, 1).min() > 9_000  # no empty or starved bin


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: capturing runs the Python (as a real capture does) and remembers the
    result; a replay runs nothing and counts itself."""

    replays = 0

    def replay(self):
        _FakeGraph.replays += 1


def test_wrapper_runs_each_kind_eagerly_then_captures_then_replays(make_args, monkeypatch):
    import contextlib

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    _FakeGraph.replays = 0
    pipe, args = _chipmunk_pipe(make_args, 6)
    transformer = pipe.transformer
    eager_forward = transformer.forward
    calls = []

    def forward(**tensors):
        calls.append(transformer.chipmunk_layers[0].state.clock.step)
        return eager_forward(**tensors, return_dict=False)

    graphs = chipmunk_graphs.ChipmunkStepGraphs(forward, transformer.chipmunk_layers, transformer.chipmunk_config,
                                                transformer.chipmunk_layers[0].state.clock, torch.device("cpu"))
    compile_utils.install_compiled_forward(transformer, graphs, what="Chipmunk's step graphs")
    # tiny config, 6 steps: kinds A (dense) at 0,4; B (attention dense, reselect) 1; D (sparse) 2; C (reselect) 3,5
    _generate(pipe, args)
    assert calls == [0, 1, 2, 3, 4, 5]  # first occurrences eager, second ones captured (Python runs either way)
    assert graphs.calls == {"eager": 4, "captured": 2, "replayed": 0} and _FakeGraph.replays == 2
    assert graphs.uncaptured_kinds() == 2  # B and D: a benchmark's warm-up is not over
    stats_one = chipmunk.chipmunk_stats(pipe)
    _generate(pipe, args)  # A and C replay; B and D (seen once) are captured
    assert calls[6:] == [1, 2]
    assert graphs.calls == {"eager": 4, "captured": 4, "replayed": 4} and _FakeGraph.replays == 8
    assert graphs.uncaptured_kinds() == 0
    # A replay books what the layer's Python would have: the stats double, last step and flags are current.
    assert chipmunk.chipmunk_stats(pipe) == {k: {n: 2 * c for n, c in v.items()} for k, v in stats_one.items()}
    assert all(layer.state.last_step == 5 for layer in transformer.chipmunk_layers)
    assert all(layer.state.flags for layer in transformer.chipmunk_layers)


def test_step_graphs_are_refused_on_cpu_with_the_fix(make_args):
    from utils.pipeline_utils import StackError

    with pytest.raises(StackError, match="needs a CUDA device: use --compile_mode default"):
        validate_args(make_args("--chipmunk_config", TINY_CONFIG, "--compile_export_mode", "compile",
                                "--compile_mode", "reduce-overhead"))

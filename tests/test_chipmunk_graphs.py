"""Chipmunk's step graphs (utils/step_graphs.py with utils/chipmunk/graphs.py) on CPU: the invariants the CUDA graphs
rest on, checked on the tiny pipeline, and the wrapper's bookkeeping with a stand-in for torch.cuda.graph. Capture
and replay themselves need a GPU: `run_benchmark.py --check graphs` compares graphed and eager latents there."""

import contextlib
import types

import pytest
import torch

from chipmunk_support import TINY_CONFIG, ManualClock
from utils import compile_utils
from utils.benchmark_utils import pipeline_call_kwargs
from utils.chipmunk import chipmunk_stats, graphs, layers
from utils.chipmunk.config import MlpConfig
from utils.step_graphs import StepGraphs
from utils.pipeline_utils import load_pipeline, optimize, validate_args


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
    if isinstance(layer, layers.SparseAttention):
        return ("attn", d["dense"] == 1)
    return ("mlp", d["dense"] == 1, d["reselect"] == 1)


def test_step_kind_names_what_every_layer_decides_at_each_step(make_args):
    """The graphs are keyed by the layers' decisions (ChipmunkStepKinds.kind, before each step): they must equal
    what each layer then does, at every step of plain runs."""
    steps = 11  # tiny config: attention dense 0,1,4,8; MLP dense 0,4,8, reselect 1,3,5,7,9
    pipe, args = _chipmunk_pipe(make_args, steps)
    sparse_layers = pipe.transformer.chipmunk_layers
    assert len(sparse_layers) == 10
    seen = []

    kinds = graphs.ChipmunkStepKinds(sparse_layers)
    named = []

    def record(module, args_, kwargs):
        seen.append([dict(layer.stats) for layer in sparse_layers])
        named.append(kinds.kind(sparse_layers[0].clock.step))

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    _generate(pipe, args)
    seen.append([dict(layer.stats) for layer in sparse_layers])
    for step in range(steps):
        for layer, decision, before, after in zip(sparse_layers, named[step], seen[step], seen[step + 1]):
            expected = ("attn", decision[0]) if isinstance(layer, layers.SparseAttention) else \
                ("mlp", decision[0], decision[1])
            assert _decisions(layer, before, after) == expected, (step, layer.name)
    mlp_index = next(i for i, layer in enumerate(sparse_layers) if isinstance(layer, layers.SparseMlp))
    assert [kind[mlp_index][0] for kind in named] == [t in (0, 4, 8) for t in range(steps)]  # MLP dense steps


def test_caches_are_written_in_place_across_steps_and_generations(make_args):
    """A CUDA graph records addresses: every cache must stay the same tensor once allocated, a new generation
    included (a re-bound cache would leave the graphs reading memory nothing writes)."""
    pipe, args = _chipmunk_pipe(make_args, 3)
    _generate(pipe, args)  # steps 0 (dense), 1 (reselect), 2: every cache exists
    sparse_layers = pipe.transformer.chipmunk_layers

    def addresses():
        return [{name: getattr(layer, name).data_ptr() for name in layer.CACHES} for layer in sparse_layers]

    assert all(getattr(layer, name) is not None for layer in sparse_layers for name in layer.CACHES)
    before = addresses()
    assert set(before[0]) == {"key_index", "o_cache"} and set(before[-1]) == {"act_cache", "out_cache", "pre_mean",
                                                                               "neuron_index"}
    _generate(pipe, args, steps=9)  # dense refreshes at 4 and 8, reselections, a new generation's reset
    assert addresses() == before


def test_random_neurons_are_the_same_with_the_step_read_from_a_device_tensor():
    """A replayed graph runs no Python: the MLP's random neurons are hashed from (layer, step) with the step read
    from the clock's step tensor, which the wrapper updates before each call. They must be the neurons an eager run
    draws from the step as an int."""
    torch.manual_seed(3)
    w1, b1, w2 = torch.randn(64, 24), torch.randn(64), torch.randn(16, 64)
    config = MlpConfig(bm=32, counts_multiple_of=8, full_step_every=4, block_mask_cache=1)  # reselect every step
    eager_clock, graph_clock = ManualClock(), ManualClock()
    graph_clock.step_tensor = torch.zeros((), dtype=torch.int64)
    eager, graphed = (layers.SparseMlp(4, clock, config, w1, b1, w2, None, None) for clock in (eager_clock,
                                                                                           graph_clock))
    drawn = []
    for step in range(4):
        eager_clock.at(step), graph_clock.at(step), graph_clock.step_tensor.fill_(step)
        x = torch.randn(1, 64, 24)
        assert torch.equal(graphed(x), eager(x))
        if step:
            assert torch.equal(graphed.neuron_index, eager.neuron_index)
            drawn.append(eager.neuron_index.clone())
    assert eager.stats["reselect"] == 3 and not torch.equal(drawn[0], drawn[1])  # a new draw each step


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: capturing runs the Python (as a real capture does) and remembers the
    result; a replay runs nothing and counts itself."""

    replays = 0

    def replay(self):
        _FakeGraph.replays += 1


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    _FakeGraph.replays = 0


def test_wrapper_runs_each_kind_eagerly_then_captures_then_replays(make_args, fake_cuda_graphs):
    pipe, args = _chipmunk_pipe(make_args, 6)
    transformer = pipe.transformer
    eager_forward = transformer.forward
    calls = []

    def forward(**tensors):
        calls.append(transformer.chipmunk_layers[0].clock.step)
        return eager_forward(**tensors, return_dict=False)

    kinds = graphs.ChipmunkStepKinds(transformer.chipmunk_layers)
    step_graphs = StepGraphs(forward, [kinds], kinds.clock, torch.device("cpu"))
    compile_utils.install_compiled_forward(transformer, step_graphs, what="Chipmunk's step graphs")
    # tiny config, 6 steps: kinds A (dense) at 0,4; B (attention dense, reselect) 1; D (sparse) 2; C (reselect) 3,5
    _generate(pipe, args)
    assert calls == [0, 1, 2, 3, 4, 5]  # first occurrences eager, second ones captured (Python runs either way)
    assert step_graphs.calls == {"eager": 4, "captured": 2, "replayed": 0} and _FakeGraph.replays == 2
    assert step_graphs.uncaptured_kinds() == 2  # B and D: a benchmark's warm-up is not over
    stats_one = chipmunk_stats(pipe)
    _generate(pipe, args)  # A and C replay; B and D (seen once) are captured
    assert calls[6:] == [1, 2]
    assert step_graphs.calls == {"eager": 4, "captured": 4, "replayed": 4} and _FakeGraph.replays == 8
    assert step_graphs.uncaptured_kinds() == 0
    # A replay books what the layer's Python would have: the stats double, last step and flags are current.
    assert chipmunk_stats(pipe) == {k: {n: 2 * c for n, c in v.items()} for k, v in stats_one.items()}
    assert all(layer.last_step == 5 for layer in transformer.chipmunk_layers)
    assert all(layer.flags for layer in transformer.chipmunk_layers)


def test_a_new_input_shape_drops_the_graphs_of_the_old_one(fake_cuda_graphs):
    """The layers reallocate their caches for a new input shape, so the graphs recorded at the old shape hold freed
    memory: they are dropped, and the new shape's kinds start over (eager, then captured)."""
    clock = ManualClock()
    tiny_kind = {0: "A", 4: "A", 1: "B", 2: "D", 3: "C", 5: "C"}  # the tiny schedule's kinds, as in the test above
    participant = types.SimpleNamespace(kind=tiny_kind.get, eager_now=lambda: False, prepare=lambda step: None,
                                        captured=lambda: None, replayed=lambda step, state: None)
    calls = []

    def forward(x):
        calls.append((clock.step, x.shape[1]))
        return (x * 2,)

    step_graphs = StepGraphs(forward, [participant], clock, torch.device("cpu"))
    for length, steps in ((4, range(6)), (8, range(2)), (4, range(1))):
        for step in steps:
            clock.at(step)
            x = torch.randn(1, length)
            assert torch.equal(step_graphs(x=x)[0], x * 2)
            assert int(clock.step_tensor) == step
    # tiny config: kinds A at 0 and 4 (captured at 4), C at 3 and 5 (captured at 5); then 8 tokens start over, and
    # back at 4 tokens so does step 0 (the first graphs of 4 tokens were dropped)
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4), (5, 4), (0, 8), (1, 8), (0, 4)]
    assert step_graphs.calls == {"eager": 7, "captured": 2, "replayed": 0}
    assert step_graphs.uncaptured_kinds() == 1 and not step_graphs.graphs


def test_step_graphs_are_refused_on_cpu_with_the_fix(make_args):
    from utils.errors import StackError

    with pytest.raises(StackError, match="needs a CUDA device: use --compile_mode default"):
        validate_args(make_args("--chipmunk_config", TINY_CONFIG, "--compile_export_mode", "compile",
                                "--compile_mode", "reduce-overhead"))

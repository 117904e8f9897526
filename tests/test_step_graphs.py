"""The step graphs (utils/step_graphs.py) on CPU: the step kinds feature caching and Chipmunk report, the buffer
discipline the CUDA graphs rest on, and the wrapper with a stand-in recording whose replay reruns the forward. Capture
and replay themselves need a GPU: `run_benchmark.py --check graphs` compares graphed and eager latents there."""

from pathlib import Path

import pytest
import torch

from utils import compile_utils
from utils.benchmark_utils import pipeline_call_kwargs
from utils.pipeline_utils import StackError, load_pipeline, optimize, validate_args
from utils.step_graphs import StepGraphs, participants_of

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs/chipmunk-tiny.yml")


def _pipe(make_args, *flags, steps=10):
    args = make_args("--disable_bf16", "--num_inference_steps", str(steps), *flags)
    validate_args(args)
    return optimize(load_pipeline(args), args), args


def _generate(pipe, args, seed=0):
    return pipe(**pipeline_call_kwargs(args), generator=torch.manual_seed(seed), output_type="latent").images


def _kinds_per_step(pipe, args):
    """Each step's kinds, as the participants report them once the transformer's pre-hooks have run (the cache's
    begin_step first), and what each step then did (Chipmunk's counts, the cache's orders)."""
    participants, _, _ = participants_of(pipe.transformer)
    layers = getattr(pipe.transformer, "chipmunk_layers", [])
    cache = getattr(pipe.transformer, "harness_cache", None)
    seen = []

    def before(module, a, kw):
        seen.append([tuple(p.kind(cache.clock.step if cache else layers[0].clock.step) for p in participants),
                     [dict(layer.stats) for layer in layers]])

    def after(module, a, kw, out):
        seen[-1].append([dict(layer.stats) for layer in layers])
        seen[-1].append(cache.num_orders if cache else None)

    pipe.transformer.register_forward_pre_hook(before, with_kwargs=True)
    pipe.transformer.register_forward_hook(after, with_kwargs=True)
    _generate(pipe, args)
    return [(kind, [{k: a[k] - b[k] for k in a} for a, b in zip(after_, before_)], orders)
            for kind, before_, after_, orders in seen]


def test_cache_step_kinds_name_what_each_step_reads_and_writes(make_args):
    """HiCache at interval 3, fe 3, order 2 over 10 steps: full 0, 1 (differences only from step 2: the reference's
    quirk, so step 1 starts the ring over at buffer 0), 2, 5, 8, writing feature buffers 0, 0, 1, 2, 0; forecasts
    read 2 features until step 5 and 3 after. A window's first forecast (distance 1) computes the window's
    contributions, its second (distance 2) reads its own: the distance (and the window's length) is part of the kind.
    Forecasting each step on its own, one kind serves every distance (the weights are a buffer)."""
    pipe, args = _pipe(make_args, "--cache_mode", "hicache", "--interval", "3", "--forecast_window")
    kinds = [kind[0] for kind, _, _ in _kinds_per_step(pipe, args)]
    assert kinds == [("full", 0), ("full", 0), ("full", 1), ("forecast", 2, 1, 2), ("forecast", 2, 2, 2),
                     ("full", 2), ("forecast", 3, 1, 2), ("forecast", 3, 2, 2), ("full", 0), ("forecast", 3, 1, 2)]
    assert len(set(kinds)) == 7  # seven graphs, however many steps follow
    pipe, args = _pipe(make_args, "--cache_mode", "hicache", "--interval", "3")
    kinds = [kind[0] for kind, _, _ in _kinds_per_step(pipe, args)]
    assert kinds == [("full", 0), ("full", 0), ("full", 1), ("forecast", 2), ("forecast", 2),
                     ("full", 2), ("forecast", 3), ("forecast", 3), ("full", 0), ("forecast", 3)]


@pytest.mark.parametrize("flags", [
    ("--chipmunk_config", TINY_CONFIG),
    ("--chipmunk_config", TINY_CONFIG, "--cache_mode", "taylor", "--interval", "3"),
])
def test_steps_of_one_kind_take_the_same_decisions(make_args, flags):
    """A graph is replayed at every step of its kind, so two steps with one kind must do the same: every Chipmunk
    layer's dense/sparse/reselect counts move alike (the cache's orders are host bookkeeping: a full step's graph
    only writes its feature buffer, whatever the orders it leaves). With caching, forecast
    steps call no Chipmunk layer, and a full step's Chipmunk decisions follow the deferred schedule."""
    pipe, args = _pipe(make_args, *flags, steps=14)
    by_kind = {}
    for kind, decisions, _ in _kinds_per_step(pipe, args):
        by_kind.setdefault(kind, []).append((decisions,))
    assert len(by_kind) >= 4
    for kind, steps in by_kind.items():
        assert all(step == steps[0] for step in steps), kind
        chipmunk_kind = kind[-1]
        if chipmunk_kind is None:  # a forecast step
            assert all(d == {"dense": 0, "sparse": 0, "reselect": 0} for d in steps[0][0])
        else:
            for (dense, selects), d in zip(chipmunk_kind, steps[0][0]):
                assert d["dense"] == int(dense) and d["sparse"] == int(not dense), kind
                assert d["reselect"] == int(selects and not dense), kind


def test_cache_buffers_are_written_in_place_across_steps_and_generations(make_args):
    """A CUDA graph records addresses: the feature ring and the forecast's weights stay the same tensors once
    allocated, over steps and generations, and so do the window's (a re-bound buffer would leave the graphs reading
    memory nothing writes); a new input shape, for which the step graphs are recorded anew, gets new buffers."""
    pipe, args = _pipe(make_args, "--cache_mode", "hicache", "--interval", "3", "--forecast_window", steps=10)
    cache = pipe.transformer.harness_cache

    def buffers():
        return {key: t.data_ptr() for key, t in cache.buffers.items()}

    _generate(pipe, args)
    addresses = buffers()
    names = sorted(name for name, *_ in addresses)
    assert names == ["features 0", "features 1", "features 2", "window contributions", "window temb",
                     "window weights 2", "window weights 3"]
    assert [t.data_ptr() for t in cache.features] == [addresses[k] for k in sorted(addresses) if "features" in k[0]]
    _generate(pipe, args, seed=1)
    assert buffers() == addresses
    (tokens,) = {shape[2] for name, shape, *_ in addresses if name.startswith("features")}
    args.height, args.width = 2 * args.height, 2 * args.width
    _generate(pipe, args)
    assert {t.shape[2] for t in cache.features} == {4 * tokens} and len(cache.buffers) == len(addresses)


def _rerunning_record(self, static_in):
    """A stand-in for a CUDA graph: its replay reruns the forward into the static outputs."""
    static_out = self.forward(**static_in)

    class Replay:
        def replay(self_):
            for out, new in zip(static_out, self.forward(**static_in)):
                out.copy_(new)
    return Replay(), static_out


def test_dense_step_graph_is_one_kind_and_reproduces_the_image(make_args, monkeypatch):
    """The dense stack's forward recorded as a whole (no participants): one kind, recorded at its second call;
    the forward it records takes the transformer's tensors only, and gives the eager image."""
    pipe, args = _pipe(make_args, steps=3)
    reference = _generate(pipe, args, seed=3)
    monkeypatch.setattr(StepGraphs, "_record", _rerunning_record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    participants, clock, _ = participants_of(pipe.transformer)
    assert participants == [] and clock is None
    graphs = StepGraphs(compile_utils.tensor_forward(pipe.transformer), participants, clock, pipe.transformer.device)
    compile_utils.install_compiled_forward(pipe.transformer, graphs, what="test")
    torch.testing.assert_close(_generate(pipe, args, seed=3), reference, rtol=0, atol=0)
    assert graphs.calls == {"eager": 1, "captured": 1, "replayed": 1} and len(graphs.graphs) == 1
    (_, static_in, _, _), = graphs.graphs.values()
    assert {"hidden_states", "timestep"} <= set(static_in) <= set(compile_utils.TENSOR_KWARGS)


def test_a_recorded_forward_reuses_the_compiled_blocks_without_recompiling(make_args, monkeypatch):
    """The recorded forward calls the compiled blocks as the pipeline does: with joint_attention_kwargs={} (FluxPipeline
    turns None into {}), whose type the blocks' guards check. Handing them None recompiled every block kind, and on the
    H200 the recompiled kernels (tuned anew) made Chipmunk's step graphs differ from eager by 4e-3 in some processes.
    The Chipmunk stack, regionally compiled, on CPU, through the step graphs with a rerunning stand-in for the
    recording: no new graph, same latents."""
    from torch._dynamo.utils import counters

    pipe, args = _pipe(make_args, "--chipmunk_config", TINY_CONFIG, "--compile_export_mode", "compile",
                       "--compile_scope", "regional", steps=4)
    reference = _generate(pipe, args, seed=5)
    compiled_before = counters["stats"]["unique_graphs"]
    monkeypatch.setattr(StepGraphs, "_record", _rerunning_record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    participants, clock, _ = participants_of(pipe.transformer)
    graphs = StepGraphs(compile_utils.tensor_forward(pipe.transformer), participants, clock, pipe.transformer.device)
    compile_utils.install_compiled_forward(pipe.transformer, graphs, what="test")
    recorded = pipe(**pipeline_call_kwargs(args), generator=torch.manual_seed(5), output_type="latent").images
    assert counters["stats"]["unique_graphs"] == compiled_before
    torch.testing.assert_close(recorded, reference, rtol=0, atol=0)
    assert graphs.calls["eager"] == 4  # four steps, each the first of its kind in a first generation


def test_full_scope_compile_runs_the_step_graphs_outside_the_compiled_code(make_args, monkeypatch):
    """Scope full under the step graphs compiles `transformer.forward` (forward_only), and the graphs wrap it: the
    module's own compiled call would trace StepGraphs.__call__ (dynamo refused its sort of the input shapes on the
    H100). On CPU with the rerunning stand-in: the compiled forward gives the eager image, StepGraphs runs its
    bookkeeping in Python (one capture, one replay)."""
    import torch._dynamo

    torch._dynamo.reset()
    pipe, args = _pipe(make_args, steps=3)
    reference = _generate(pipe, args, seed=4)
    compile_utils.compile_transformer(pipe.transformer, "full", "default", forward_only=True)
    assert pipe.transformer._compiled_call_impl is None
    monkeypatch.setattr(StepGraphs, "_record", _rerunning_record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    graphs = StepGraphs(compile_utils.tensor_forward(pipe.transformer), [], None, pipe.transformer.device)
    compile_utils.install_compiled_forward(pipe.transformer, graphs, what="test")
    torch.testing.assert_close(_generate(pipe, args, seed=4), reference, rtol=1e-4, atol=1e-5)
    assert graphs.calls == {"eager": 1, "captured": 1, "replayed": 1}


def test_data_dependent_caches_refuse_cuda_graphs_with_the_reason(make_args):
    with pytest.raises(StackError, match="cannot hold --cache_mode fbcache's data-dependent per-step decision"):
        validate_args(make_args("--cache_mode", "fbcache", "--compile_export_mode", "compile",
                                "--compile_mode", "reduce-overhead"))
    pipe, _ = _pipe(make_args, "--cache_mode", "fbcache", steps=2)
    with pytest.raises(StackError, match="decides each step from the data"):
        pipe.transformer.harness_cache.graph_kinds()


def test_step_graphs_need_a_gpu(make_args):
    with pytest.raises(StackError, match="needs a CUDA device: use --compile_mode default on CPU"):
        validate_args(make_args("--cache_mode", "hicache", "--compile_export_mode", "compile",
                                "--compile_mode", "reduce-overhead"))


def test_text_encoder_graphs_record_the_compiled_layers_without_the_glue_or_a_recompile(make_args, monkeypatch):
    """FLUX's CLIP and T5 layers (compiled) through EncoderLayerGraphs, with a stand-in recording during which
    `torch.cuda.is_current_stream_capturing()` says True, as in a real capture (transformers' glue decides by it):
    the recording runs the layers only, never the glue (embeddings); nothing compiles after the eager calls; the
    prompt embeddings equal the eager ones bit for bit, the model's output class kept; a shape seen once keeps the
    warm-up going; with hidden states wanted (transformers hooks the layers) the layers run eagerly."""
    from torch._dynamo.utils import counters

    from utils.step_graphs import encoder_graphs, install_encoder_graphs, pipeline_graphs

    pipe, args = _pipe(make_args, steps=2)
    compile_utils.compile_text_encoders(pipe)
    encode = lambda: pipe.encode_prompt("a red fox", prompt_2=None, max_sequence_length=32)[:2]  # T5, pooled CLIP
    with torch.no_grad():
        want = encode()
    capturing, glue_in_capture = [False], []

    def record(self, static_in):
        capturing[0] = True
        try:
            return _rerunning_record(self, static_in)
        finally:
            capturing[0] = False

    monkeypatch.setattr(StepGraphs, "_record", record)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    encoders = compile_utils.flux_text_encoders(pipe)
    for model in encoders:
        with monkeypatch.context() as on_cuda:  # install_encoder_graphs' CUDA check satisfied, for the install only
            on_cuda.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
            install_encoder_graphs(model)
    clip_glue = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).embeddings
    for name, glue in (("clip", clip_glue), ("t5", pipe.text_encoder_2.encoder.embed_tokens)):
        glue.register_forward_hook(lambda *a, name=name: glue_in_capture.append(name) if capturing[0] else None)
    assert pipeline_graphs(pipe) == [encoder_graphs(m) for m in encoders] and len(encoders) == 2
    compiled = counters["stats"]["unique_graphs"]
    for call in range(3):
        with torch.no_grad():
            got = encode()
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert sum(g.uncaptured_kinds() for g in pipeline_graphs(pipe)) == (2 if call == 0 else 0)
    assert counters["stats"]["unique_graphs"] == compiled and glue_in_capture == []
    assert [encoder_graphs(m).calls for m in encoders] == [{"eager": 1, "captured": 1, "replayed": 1}] * 2
    ids = torch.zeros(1, 32, dtype=torch.long)
    with torch.no_grad():
        out = pipe.text_encoder_2(ids, output_hidden_states=True)
        assert len(out.hidden_states) == 1 + 4  # the embeddings and each of the tiny T5's 4 layers
        assert encoder_graphs(pipe.text_encoder_2).calls["replayed"] == 1  # that call ran the layers eagerly
        assert type(pipe.text_encoder(ids[:, :8])).__name__ == "BaseModelOutputWithPooling"

"""torch.export + AOTInductor on CPU with the tiny transformer (fused QKV + the FA3 op): the package
matches eager, is reused from the cache, and is rebuilt (never misused) when its key changes. CUDA graphs
need a GPU and are not exercised here."""

import json
import re

import numpy as np
import pytest
import torch

from utils import compile_utils
from utils.attention import FA3FluxAttnProcessor
from utils.flux_builders import build_tiny_pipeline


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pipe = build_tiny_pipeline(seed=0)
    pipe.transformer.fuse_qkv_projections()
    pipe.transformer.set_attn_processor(FA3FluxAttnProcessor())
    example = compile_utils.transformer_example_kwargs(pipe, 64, 64, 32)
    key = compile_utils.export_cache_key(pipe, example, {"test": "stack"})
    cache_dir = tmp_path_factory.mktemp("aoti")
    compiled, status = compile_utils.load_or_build_aoti(pipe.transformer, example, key, cache_dir)
    return pipe, example, key, cache_dir, compiled, status


def test_exported_package_matches_eager_on_fresh_inputs(exported):
    pipe, example, key, cache_dir, compiled, status = exported
    assert status == f"built {compile_utils.export_package_path(cache_dir, key).name}"
    torch.manual_seed(7)
    fresh = {k: torch.randn_like(v) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
             for k, v in example.items()}
    with torch.no_grad():
        ref = pipe.transformer(**fresh, return_dict=False)[0]
        out = compiled(**fresh)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert ref.abs().mean() > 0.1
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_matching_package_is_loaded_from_the_cache(exported):
    pipe, example, key, cache_dir, _, _ = exported
    _, status = compile_utils.load_or_build_aoti(pipe.transformer, example, key, cache_dir, require_cached=True)
    assert status == f"cached {compile_utils.export_package_path(cache_dir, key).name}"


def test_mismatched_key_or_sidecar_rebuilds_and_never_loads(exported, monkeypatch):
    pipe, example, key, cache_dir, _, _ = exported

    class Rebuilt(Exception):
        pass

    def spy(*args, **kwargs):
        raise Rebuilt
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", spy)
    other_shapes = {**key, "inputs": {**key["inputs"], "hidden_states": [[1, 1024, 16], "torch.float32"]}}
    with pytest.raises(Rebuilt):
        compile_utils.load_or_build_aoti(pipe.transformer, example, other_shapes, cache_dir)
    with pytest.raises(FileNotFoundError, match="--use-cached-model"):
        compile_utils.load_or_build_aoti(pipe.transformer, example, other_shapes, cache_dir, require_cached=True)
    # Same file name but a sidecar that disagrees (a hash collision, or a hand-copied package): rebuild.
    sidecar = compile_utils.export_package_path(cache_dir, key).with_suffix(".json")
    stored = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**stored, "gpu": "some other GPU"}))
    try:
        with pytest.raises(Rebuilt):
            compile_utils.load_or_build_aoti(pipe.transformer, example, key, cache_dir)
    finally:
        sidecar.write_text(json.dumps(stored))


def test_installed_forward_runs_the_pipeline_like_eager(exported):
    pipe, _, _, _, compiled, _ = exported
    kwargs = dict(prompt="a red cat", height=64, width=64, num_inference_steps=3, max_sequence_length=32,
                  output_type="np")
    eager = pipe(**kwargs, generator=torch.manual_seed(0)).images[0]
    compile_utils.install_compiled_forward(pipe.transformer, compiled)
    try:
        assert pipe.transformer.forward.is_aoti
        out = pipe(**kwargs, generator=torch.manual_seed(0)).images[0]
    finally:
        pipe.transformer.forward = pipe.transformer.forward.eager_forward
    assert np.abs(out - eager).max() < 1e-4 and eager.std() > 0.01


def test_float8_weights_reach_the_package_as_their_inner_tensors(tmp_path, float8_on_cpu):
    # torchao float8 weights are tensor subclasses; the package knows them as plain inner tensors named
    # `<owner>.parametrizations.weight.original<i>` (torchao's GPU check bypassed: see float8_on_cpu).
    torchao_quant = float8_on_cpu
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(torch.bfloat16)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        bf16_out = mlp(x).float()  # before quantization
    torchao_quant.quantize_(mlp, torchao_quant.Float8DynamicActivationFloat8WeightConfig(
        granularity=torchao_quant.PerRow()))
    constants = compile_utils.export_constants(mlp)
    assert "0.parametrizations.weight.original0" in constants and "0.bias" in constants
    assert all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in constants.values())

    class Wrapper(torch.nn.Module):  # load_or_build_aoti calls forward(**tensors, return_dict=False)
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, hidden_states, return_dict=False):
            return (self.mlp(hidden_states),)

    model = Wrapper()
    key = {"test": "float8", "inputs": [32, 64]}
    compiled, status = compile_utils.load_or_build_aoti(model, {"hidden_states": x}, key, tmp_path)
    assert status == f"built {compile_utils.export_package_path(tmp_path, key).name}"
    with torch.no_grad():
        out = compiled(hidden_states=x)
    out = (out[0] if isinstance(out, (list, tuple)) else out).float()
    rel = ((out - bf16_out).norm() / bf16_out.norm()).item()
    assert rel < 0.1, rel  # float8 rounding (~5%), not scrambled weights (~100%)


def test_tanh_gelu_via_sigmoid_is_the_tanh_approximation():
    x = torch.randn(4096, dtype=torch.float64) * 4
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(compile_utils.TanhGELU()(x), ref, rtol=1e-12, atol=1e-12)
    xb = x.to(torch.bfloat16)  # computed in float32, rounded once to bfloat16: within one bf16 rounding of torch's
    torch.testing.assert_close(compile_utils.TanhGELU()(xb), torch.nn.functional.gelu(xb, approximate="tanh"),
                               rtol=8e-3, atol=1e-5)


def test_use_sigmoid_gelu_swaps_the_mlps_and_keeps_the_output():
    pipe = build_tiny_pipeline(seed=0)
    transformer = pipe.transformer
    names = set(dict(transformer.named_parameters()))
    torch.manual_seed(7)
    example = compile_utils.transformer_example_kwargs(pipe, 64, 64, 32)
    with torch.no_grad():
        before = transformer(**example, return_dict=False)[0]
        n_double, n_single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
        assert compile_utils.use_sigmoid_gelu(transformer) == 2 * n_double + n_single
        after = transformer(**example, return_dict=False)[0]
    block = transformer.transformer_blocks[0]
    assert isinstance(block.ff.net[0], compile_utils.LinearTanhGELU)
    assert isinstance(block.ff_context.net[0], compile_utils.LinearTanhGELU)
    assert isinstance(transformer.single_transformer_blocks[0].act_mlp, compile_utils.TanhGELU)
    assert set(dict(transformer.named_parameters())) == names  # same weight names: loading and float8 unaffected
    assert ((after - before).norm() / before.norm()).item() < 1e-6 and before.abs().max() > 0
    assert compile_utils.use_sigmoid_gelu(transformer) == 0  # already swapped: nothing left to do


def test_regional_export_builds_one_package_per_block_kind_and_matches_eager(tmp_path):
    """Each block runs its kind's package with its own weights (one shared set of weights would not match eager);
    a second install loads both packages from the cache."""
    pipe = build_tiny_pipeline(seed=0)
    pipe.transformer.fuse_qkv_projections()
    pipe.transformer.set_attn_processor(FA3FluxAttnProcessor())
    example = compile_utils.transformer_example_kwargs(pipe, 64, 64, 32)
    key = compile_utils.export_cache_key(pipe, example, {"test": "regional"})
    torch.manual_seed(11)
    fresh = {k: torch.randn_like(v) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
             for k, v in example.items()}
    with torch.no_grad():
        ref = pipe.transformer(**fresh, return_dict=False)[0]
    forward, status = compile_utils.load_or_build_regional_aoti(pipe.transformer, example, key, tmp_path)
    assert status.startswith("regional: 2 double blocks (built flux_double_block_")
    assert "4 single blocks (built" in status
    assert sorted(p.name.split("_")[1] for p in tmp_path.glob("*.pt2")) == ["double", "single"]
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert all(getattr(b.forward, "is_aoti", False) for b in blocks)
    with torch.no_grad():
        out = forward(**fresh)[0]
    assert ref.abs().mean() > 0.1 and ((out - ref).norm() / ref.norm()).item() < 1e-5

    again = build_tiny_pipeline(seed=0)
    again.transformer.fuse_qkv_projections()
    again.transformer.set_attn_processor(FA3FluxAttnProcessor())
    _, status = compile_utils.load_or_build_regional_aoti(again.transformer, example, key, tmp_path,
                                                          require_cached=True)
    assert "(cached flux_double_block_" in status and "(cached flux_single_block_" in status


def test_a_package_its_loader_cannot_load_is_refused_with_the_alternative_before_this_process_loads_it(tmp_path):
    # On an H200 image the AOTI loader crashed on every CUDA package that its CXX built (docs/DESIGN.md): the package
    # is first loaded in a child process, and a failure there is an error naming the compiler and the two ways out.
    bad = tmp_path / "flux_double_block_0.pt2"
    bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(compile_utils.PackageLoadError,
                       match=f"in a child process.*{re.escape(compile_utils.cxx_compiler())} \\(from \\$CXX\\).*"
                             f"{re.escape('CXX=/usr/bin/g++')}.*--compile_mode reduce-overhead"):
        compile_utils.load_package_with_weights(bad, torch.nn.Linear(4, 4))


def test_the_cache_key_names_the_cxx_compiler_so_another_one_rebuilds_the_package(exported):
    # The package's .so is the compiler's output: switching CXX (the fix for the loader crash) must not reuse it.
    pipe, example, key, cache_dir, _, _ = exported
    assert key["cxx"] == torch._inductor.config.cpp.cxx[1] == compile_utils.cxx_compiler()
    other = {**key, "cxx": "/usr/bin/some-other-g++"}
    assert compile_utils.export_package_path(cache_dir, other) != compile_utils.export_package_path(cache_dir, key)


def test_the_cache_key_names_the_harness_ops_signatures_so_a_changed_op_rebuilds_the_package(exported):
    # The fa3 op lost its dtype argument (torch 2.11's proxy executor mistranslated it): a package built against the
    # old signature would call the op with four arguments.
    pipe, example, key, cache_dir, _, _ = exported
    assert "flux_harness::fa3_attention(Tensor q, Tensor k, Tensor v) -> Tensor" in key["ops"]
    old = {**key, "ops": ["flux_harness::fa3_attention(Tensor q, Tensor k, Tensor v, ScalarType? out_dtype=None) "
                          "-> Tensor"]}
    assert compile_utils.export_package_path(cache_dir, old) != compile_utils.export_package_path(cache_dir, key)


def test_a_package_another_process_is_building_is_waited_for_then_loaded_not_rebuilt(exported):
    """Two processes sharing a cache directory (the device's second builder process): the package's lock is held
    while one builds, and the other waits on it, then loads the finished package."""
    import fcntl
    import threading

    pipe, example, key, cache_dir, _, _ = exported
    path = compile_utils.export_package_path(cache_dir, key)
    results = []
    with open(path.with_suffix(".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a building process holds it (flock locks are per open file)
        waiter = threading.Thread(target=lambda: results.append(
            compile_utils.load_or_build_aoti(pipe.transformer, example, key, cache_dir, require_cached=True)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not results  # blocked on the lock, not loading a half-written package
    waiter.join(timeout=120)
    assert not waiter.is_alive() and results[0][1].startswith("cached ")

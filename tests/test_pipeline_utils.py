"""optimize(): every --disable_* flag toggles its layer (checked on the modules), invalid combinations
stop before any work, and QKV fusion is lossless."""

import numpy as np
import pytest
import torch

import utils.attention as attention
from utils.attention import FA3FluxAttnProcessor
from utils.pipeline_utils import StackError, load_pipeline, optimize, pixels_on_device, validate_args


def _optimized(make_args, *flags, fa3_available=False, monkeypatch=None):
    args = validate_args(make_args("--disable_bf16", *flags))
    if fa3_available:  # pretend FA3 is present: the op then runs its SDPA fallback on CPU
        monkeypatch.setattr(attention, "fa3_unavailable_reason", lambda: None)
    return optimize(load_pipeline(args), args), args


def _processors(pipe):
    return set(type(p) for p in pipe.transformer.attn_processors.values())


def _image(pipe, args, seed=0):
    return pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=3, guidance_scale=3.5,
                max_sequence_length=32, generator=torch.manual_seed(seed), output_type="np").images[0]


def test_defaults_on_cpu_apply_fusion_and_report_cuda_layers_unavailable(make_args, capsys):
    pipe, args = _optimized(make_args)
    stack = pipe.harness_stack
    assert stack["qkv_fusion"] == "applied"
    assert all(a.fused_projections for a in _attention_modules(pipe))
    assert stack["attention"].startswith("unavailable (no CUDA device)")
    assert stack["float8_quant"].startswith("unavailable")
    assert stack["compile_export"].startswith("skipped") and args.compile_export_mode == "disabled"
    printed = capsys.readouterr().out
    assert sum(line.startswith("[stack]") for line in printed.splitlines()) == 8  # one line per layer


def _attention_modules(pipe):
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    return [b.attn for b in blocks]


def test_disable_fused_projections_keeps_separate_qkv(make_args):
    pipe, _ = _optimized(make_args, "--disable_fused_projections")
    assert not any(a.fused_projections for a in _attention_modules(pipe))
    assert not any(hasattr(a, "to_qkv") for a in _attention_modules(pipe))
    assert pipe.harness_stack["qkv_fusion"].startswith("skipped")


def test_fa3_flag_swaps_attention_processors(make_args, monkeypatch):
    pipe, _ = _optimized(make_args, fa3_available=True, monkeypatch=monkeypatch)
    assert _processors(pipe) == {FA3FluxAttnProcessor}
    pipe_off, _ = _optimized(make_args, "--disable_fa3", fa3_available=True, monkeypatch=monkeypatch)
    assert FA3FluxAttnProcessor not in _processors(pipe_off)
    assert pipe_off.harness_stack["attention"].startswith("skipped (--disable_fa3)")


def test_fa3_processor_matches_diffusers_attention(make_args, monkeypatch):
    # Same weights, same seed: the FA3 processor (SDPA fallback on CPU) computes diffusers' attention.
    ref_pipe, args = _optimized(make_args, "--disable_fa3")
    fa3_pipe, _ = _optimized(make_args, fa3_available=True, monkeypatch=monkeypatch)
    a, b = _image(ref_pipe, args), _image(fa3_pipe, args)
    assert np.abs(a - b).max() < 1e-5


def test_qkv_fusion_is_lossless(make_args):
    fused, args = _optimized(make_args, "--disable_fa3")
    unfused, _ = _optimized(make_args, "--disable_fa3", "--disable_fused_projections")
    from utils.compile_utils import transformer_example_kwargs

    torch.manual_seed(123)
    example = transformer_example_kwargs(fused, 64, 64, 32)
    with torch.no_grad():
        out_f = fused.transformer(**example, return_dict=False)[0]
        out_u = unfused.transformer(**example, return_dict=False)[0]
    rel = ((out_f - out_u).norm() / out_u.norm()).item()
    assert rel < 1e-5, rel  # fp32: one GEMM vs three, same sums up to reassociation
    assert not torch.equal(out_f, torch.zeros_like(out_f))


def test_inductor_flags_toggle(make_args):
    cfg = torch._inductor.config
    before = (cfg.coordinate_descent_tuning, cfg.triton.multi_kernel, cfg.fx_graph_cache)
    try:
        cfg.coordinate_descent_tuning, cfg.triton.multi_kernel, cfg.fx_graph_cache = False, 0, True
        pipe, _ = _optimized(make_args, "--disable_inductor_tuning_flags")
        assert pipe.harness_stack["inductor_flags"].startswith("skipped")
        assert (cfg.coordinate_descent_tuning, cfg.triton.multi_kernel, cfg.fx_graph_cache) == (False, 0, True)
        pipe, _ = _optimized(make_args, "--compile_export_mode", "compile")  # the flags apply to compiled runs
        assert cfg.coordinate_descent_tuning is True and cfg.epilogue_fusion is False
        # persistent reductions, with the FX-graph cache off (torch 2.11 crashes loading multi-kernel graphs)
        assert cfg.triton.multi_kernel == 1 and cfg.fx_graph_cache is False
        assert "triton.multi_kernel=1" in pipe.harness_stack["inductor_flags"]
    finally:
        cfg.coordinate_descent_tuning, cfg.triton.multi_kernel, cfg.fx_graph_cache = before


def test_inductor_layer_swaps_gelu_only_for_compiled_code(make_args):
    from utils.compile_utils import TanhGELU

    def swapped(pipe):
        return sum(isinstance(b.act_mlp, TanhGELU) for b in pipe.transformer.single_transformer_blocks)

    pipe, _ = _optimized(make_args, "--compile_export_mode", "compile", "--compile_scope", "regional")
    assert swapped(pipe) == len(pipe.transformer.single_transformer_blocks) > 0
    assert "tanh-GELU as x*sigmoid(2u) in 8 MLPs" in pipe.harness_stack["inductor_flags"]
    pipe, _ = _optimized(make_args, "--compile_export_mode", "compile", "--disable_inductor_tuning_flags")
    assert swapped(pipe) == 0
    pipe, _ = _optimized(make_args)  # eager on CPU
    assert swapped(pipe) == 0 and pipe.harness_stack["inductor_flags"].startswith("skipped (eager run")


def test_compile_mode_compiles_the_transformer_or_its_blocks(make_args):
    pipe, _ = _optimized(make_args, "--compile_export_mode", "compile", "--compile_scope", "regional")
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert pipe.transformer._compiled_call_impl is None
    full, _ = _optimized(make_args, "--compile_export_mode", "compile", "--compile_scope", "full")
    assert full.transformer._compiled_call_impl is not None
    eager, _ = _optimized(make_args, "--compile_export_mode", "disabled")
    assert eager.transformer._compiled_call_impl is None
    # CUDA-graph modes compile without inductor's graph trees (the whole forward is recorded instead, on a GPU).
    graphed, _ = _optimized(make_args, "--compile_export_mode", "compile", "--compile_scope", "regional",
                            "--compile_mode", "reduce-overhead")
    assert "mode=default) + no CUDA graphs (no CUDA device)" in graphed.harness_stack["compile_export"]


def test_compile_mode_compiles_the_vae_decoder_in_channels_last_and_decodes_as_eager(make_args):
    eager, args = _optimized(make_args)
    compiled, _ = _optimized(make_args, "--compile_export_mode", "compile", "--compile_scope", "regional")
    assert compiled.vae.decoder._compiled_call_impl is not None and eager.vae.decoder._compiled_call_impl is None
    assert "VAE decoder channels_last + torch.compile" in compiled.harness_stack["compile_export"]
    conv = compiled.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    latents = torch.randn(1, eager.vae.config.latent_channels, 16, 16)
    with torch.no_grad():
        want, got = eager.vae.decode(latents).sample, compiled.vae.decode(latents).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    kept, _ = _optimized(make_args, "--compile_export_mode", "compile", "--disable_vae_compile")
    assert kept.vae.decoder._compiled_call_impl is None
    assert "VAE decoder eager (--disable_vae_compile)" in kept.harness_stack["compile_export"]


def test_compile_mode_compiles_the_text_encoders_layer_by_layer_and_encodes_as_eager(make_args):
    eager, args = _optimized(make_args)
    compiled, _ = _optimized(make_args, "--compile_export_mode", "compile", "--compile_scope", "regional")
    from utils.compile_utils import text_encoder_layers

    layers = [*text_encoder_layers(compiled.text_encoder), *text_encoder_layers(compiled.text_encoder_2)]
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert eager.text_encoder_2.encoder.block[0]._compiled_call_impl is None
    assert "text encoders torch.compile: CLIPTextModel" in compiled.harness_stack["compile_export"]
    with torch.no_grad():
        want = eager.encode_prompt("a red fox", prompt_2=None, max_sequence_length=32)
        got = compiled.encode_prompt("a red fox", prompt_2=None, max_sequence_length=32)
    for w, g in zip(want[:2], got[:2]):  # T5 embeddings, pooled CLIP embedding
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    kept, _ = _optimized(make_args, "--compile_export_mode", "compile", "--disable_text_encoder_compile")
    assert kept.text_encoder_2.encoder.block[0]._compiled_call_impl is None
    assert "text encoders eager (--disable_text_encoder_compile)" in kept.harness_stack["compile_export"]
    on_cpu, _ = _optimized(make_args, "--compile_export_mode", "compile", "--compile_mode", "reduce-overhead",
                           "--text_encoder_graphs")  # opt-in CUDA graphs of the encoders: said unavailable on CPU
    assert "CLIPTextModel (4 layers), T5EncoderModel (4 layers), no CUDA graphs (no CUDA device)" in \
        on_cpu.harness_stack["compile_export"]


@pytest.mark.parametrize("channels", [3, 1])
def test_pixels_made_on_the_device_equal_diffusers_postprocess(channels):
    from diffusers.image_processor import VaeImageProcessor

    reference, fast = VaeImageProcessor(), VaeImageProcessor()
    pixels_on_device(fast)
    g = torch.Generator().manual_seed(channels)
    for dtype in (torch.bfloat16, torch.float32):
        # values past [-1, 1] are clamped; 0.5 / 255 steps hit the round-half-to-even ties
        image = torch.cat([torch.randn(2, channels, 16, 24, generator=g) * 1.5,
                           (torch.arange(2 * channels * 8 * 24) % 256 / 255 * 2 - 1 + 1 / 255).view(2, channels, 8, 24)],
                          dim=2).to(dtype)
        want, got = reference.postprocess(image, output_type="pil"), fast.postprocess(image, output_type="pil")
        assert [w.mode for w in want] == [x.mode for x in got]
        assert all(w.tobytes() == x.tobytes() for w, x in zip(want, got))
    np_image = fast.postprocess(image, output_type="np")  # other output types: diffusers' own
    assert isinstance(np_image, np.ndarray) and np_image.dtype == np.float32


@pytest.mark.parametrize("flags, message", [
    (["--fa3_fp8", "--disable_fa3"], "--fa3_fp8 needs FA3"),
    (["--fa3_fp8"], "needs a Hopper GPU"),
    (["--compile_export_mode", "export_aoti"], "needs CUDA"),
    (["--device", "cuda"], "no CUDA device"),
    (["--height", "72"], "multiples of 16"),
    (["--use-cached-model"], "only applies to --compile_export_mode export_aoti"),
    (["--cache_mode", "cache_dit"], "needs --cache_dit_config"),
    (["--ckpt", "black-forest-labs/FLUX.1-schnell", "--cache_dit_config", "configs/cache_dit.yaml"],
     "not for FLUX.1-schnell"),
    (["--compile_export_mode", "compile", "--compile_mode", "reduce-overhead", "--cache_mode", "fbcache"],
     "replays recorded CUDA graphs, which cannot hold --cache_mode fbcache"),
    (["--compile_export_mode", "compile", "--compile_mode", "reduce-overhead", "--cache_mode", "taylor"],
     "one CUDA graph per step kind, which needs a CUDA device"),
    (["--compile_export_mode", "compile", "--compile_mode", "max-autotune", "--chipmunk_config",
      "configs/chipmunk-tiny.yml"], "one CUDA graph per step kind, which needs a CUDA device"),
    (["--compile_export_mode", "compile", "--compile_mode", "reduce-overhead", "--chipmunk_config",
      "configs/chipmunk-tiny.yml", "--cache_mode", "hicache"], "one CUDA graph per step kind, which needs a CUDA"),
    (["--compile_export_mode", "compile", "--text_encoder_graphs"], "needs --compile_export_mode compile "
                                                                    "--compile_mode reduce-overhead"),
    (["--compile_export_mode", "compile", "--compile_mode", "reduce-overhead", "--text_encoder_graphs",
      "--disable_text_encoder_compile"], "without --disable_text_encoder_compile"),
])
def test_invalid_combinations_raise_before_any_work(make_args, flags, message):
    with pytest.raises(StackError, match=message):
        validate_args(make_args(*flags))


def test_export_with_caching_is_refused_with_the_fix(make_args, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # validation only: nothing runs
    with pytest.raises(StackError, match="data-dependent feature caching.*--compile_export_mode compile"):
        validate_args(make_args("--device", "cuda", "--compile_export_mode", "export_aoti", "--cache_mode", "fbcache"))
    args = validate_args(make_args("--device", "cuda", "--cache_mode", "taylor"))
    assert args.compile_export_mode == "compile" and args.compile_scope == "regional"
    args = validate_args(make_args("--device", "cuda"))
    assert args.compile_export_mode == "export_aoti"
    assert args.compile_scope == "regional"  # the whole float8 transformer did not build in 8 minutes on the H200


def test_missing_checkpoint_offline_is_a_clear_error(make_args, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match="(?s)not in the local Hugging Face cache.*hf download.*--local-dir"):
        load_pipeline(make_args("--ckpt", "black-forest-labs/FLUX.1-dev"))


@pytest.mark.parametrize("flag, layer", [
    ("--disable_fused_projections", "qkv_fusion"), ("--disable_fa3", "attention"),
    ("--disable_chipmunk", "chipmunk"), ("--disable_cache", "feature_cache"), ("--disable_quant", "float8_quant"),
    ("--disable_inductor_tuning_flags", "inductor_flags"),
])
def test_every_disable_flag_reports_its_layer_skipped(make_args, flag, layer):
    pipe, _ = _optimized(make_args, flag, "--cache_mode", "taylor", "--chipmunk_config", "configs/chipmunk-tiny.yml")
    assert pipe.harness_stack[layer].startswith(f"skipped ({flag})")
    others = {k: v for k, v in pipe.harness_stack.items() if k not in (layer, "compile_export")}
    assert not any(v.startswith(f"skipped ({flag})") for v in others.values())


def test_float8_quantizes_only_the_blocks_linears(make_args, float8_on_cpu):
    """The embedders and output layer run eagerly outside the compiled blocks: they stay bf16 (see in_blocks)."""
    from utils.pipeline_utils import quantize_float8

    transformer = load_pipeline(validate_args(make_args())).transformer.to(torch.bfloat16)
    quantize_float8(transformer, "row")
    linears = {name: type(m.weight) for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    in_blocks = {n: t for n, t in linears.items() if n.startswith(blocks)}
    outside = {n: t for n, t in linears.items() if n not in in_blocks}
    assert "x_embedder" in outside and "proj_out" in outside and "transformer_blocks.0.ff.net.2" in in_blocks
    assert all(t is torch.nn.Parameter for t in outside.values()), outside
    assert all(t is not torch.nn.Parameter and "Float8" in t.__name__ for t in in_blocks.values()), in_blocks


def test_float8_leaves_qwen_images_text_stream_in_bf16(make_args, float8_on_cpu):
    from utils.pipeline_utils import quantize_float8

    transformer = load_pipeline(validate_args(make_args("--ckpt", "tiny:qwen-image"))).transformer.to(torch.bfloat16)
    assert "text stream bf16" in quantize_float8(transformer, "row")
    kinds = {name: "Float8" in type(m.weight).__name__ for name, m in transformer.named_modules()
             if isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks.0.")}
    text = {n for n in kinds if any(p in n for p in ("txt_mod", "txt_mlp", "add_q_proj", "add_k_proj", "add_v_proj",
                                                   "to_add_out"))}
    assert text and not any(kinds[n] for n in text), kinds
    image = set(kinds) - text
    assert {"transformer_blocks.0.img_mlp.net.2", "transformer_blocks.0.attn.to_q"} <= image and all(
        kinds[n] for n in image), kinds


def test_float8_leaves_the_inductor_config_to_the_inductor_layer(make_args, float8_on_cpu):
    # torchao's float8 config turns on coordinate-descent tuning process-wide unless told not to: with it, an ablation
    # with --disable_inductor_tuning_flags still tuned.
    import torch._inductor.config as cfg

    from utils.pipeline_utils import quantize_float8

    transformer = load_pipeline(validate_args(make_args())).transformer.to(torch.bfloat16)
    names = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul")
    before = {name: getattr(cfg, name) for name in names}
    try:
        for name in names:
            setattr(cfg, name, False)
        quantize_float8(transformer, "row")
        assert {name: getattr(cfg, name) for name in names} == dict.fromkeys(names, False)
        assert "Float8" in type(transformer.transformer_blocks[0].ff.net[2].weight).__name__  # it did quantize
    finally:
        for name, value in before.items():
            setattr(cfg, name, value)

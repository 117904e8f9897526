"""The Qwen-Image and FLUX.1-Kontext backends offline on CPU: their tiny and full-size random builders, the stack's
layers that apply to Qwen-Image (FA3's processor, the harness's caches on its blocks, diffusers' hooks, the step
graphs' inputs) and those refused by name, and Kontext's input image through gen_image.py, run_benchmark.py and an
editing sweep."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import gen_image
import run_ablation
import run_benchmark
from utils import compile_utils
from utils.benchmark_utils import check_args, check_ckpt, pipeline_call_kwargs
from utils.caching import forecast_coefficients, forecast_image_stream, predict
from utils.pipeline_utils import StackError, load_pipeline, optimize, validate_args

ROOT = Path(__file__).resolve().parents[1]
EDITS = ROOT / "tests/fixtures/edits"
QWEN = ("--ckpt", "tiny:qwen-image")


def generate(make_args, *flags, steps=9, pipe=None):
    args = validate_args(make_args("--disable_bf16", "--num_inference_steps", str(steps), *flags))
    if pipe is None:
        pipe = optimize(load_pipeline(args), args)
    images = pipe(**pipeline_call_kwargs(args), output_type="pt", generator=torch.Generator().manual_seed(0)).images
    return pipe, images


# --- Qwen-Image -----------------------------------------------------------------------------------------------

def test_qwen_builders_offline_tokenizer_drops_the_template_and_full_size_matches_qwen_image():
    from utils.flux_builders import build_random_pipeline, offline_qwen_tokenizer

    tokenizer = offline_qwen_tokenizer()
    template = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(template.format("a red cat")).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[33:35] == ["Ċ", "a"]  # QwenImagePipeline drops 34 tokens: exactly the system prompt here
    assert tokens[-5:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert tokenizer.decode(ids) == template.format("a red cat")
    pipe = build_random_pipeline("qwen-image", device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 20.3e9 < count(pipe.transformer) < 20.5e9  # Qwen-Image's MMDiT: 20 B
    assert 8.2e9 < count(pipe.text_encoder) < 8.4e9  # Qwen2.5-VL-7B with its vision tower
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.num_layers == 60
    assert pipe.scheduler.config.shift_terminal == 0.02 and pipe.scheduler.config.max_image_seq_len == 8192
    kontext = build_random_pipeline("flux-kontext", device="meta")
    assert type(kontext).__name__ == "FluxKontextPipeline" and kontext.transformer.config.guidance_embeds
    for ckpt in ("tiny:qwen-image", "tiny:flux-kontext", "random:qwen-image", "random:flux-kontext"):
        check_ckpt(ckpt)
    with pytest.raises(ValueError, match="unknown tiny pipeline"):
        check_ckpt("tiny:sd3")


def test_qwen_image_runs_the_stack_that_applies_and_reports_the_rest(make_args):
    pipe, reference = generate(make_args, *QWEN)
    assert type(pipe).__name__ == "QwenImagePipeline" and reference.shape == (1, 3, 64, 64)
    stack = pipe.harness_stack
    assert stack["qkv_fusion"].startswith("unavailable (Qwen-Image's attention processor computes q, k and v")
    assert stack["attention"].startswith("unavailable (no CUDA device)")
    # the harness's caches on Qwen-Image's blocks: interval 1 and threshold 0 are bitwise no cache
    for flags in (("--cache_mode", "hicache", "--interval", "1"), ("--cache_mode", "fbcache", "--fbcache_threshold", "0")):
        cached_pipe, cached = generate(make_args, *QWEN, *flags)
        assert torch.equal(cached, reference), flags
        assert cached_pipe.transformer.harness_cache.stats()["step_kinds"] == "F" * 9
    pipe, cached = generate(make_args, *QWEN, "--cache_mode", "hicache", "--interval", "3")
    stats = pipe.transformer.harness_cache.stats()
    assert stats["step_kinds"] == "FFFccFccF" and stats["flops_speedup"] > 1.5
    assert 0 < (cached - reference).abs().mean() < 0.01  # images in [0, 1]
    # diffusers' hooks that support Qwen-Image (QwenImagePipeline calls its transformer in cache_context)
    for mode in ("diffusers_fbc", "diffusers_taylorseer", "diffusers_pab", "diffusers_fastercache"):
        peer, image = generate(make_args, *QWEN, "--cache_mode", mode, "--fbcache_threshold", "0.3")
        assert peer.transformer.harness_cache.stats()["forecast_steps"] >= 1, mode
        assert torch.isfinite(image).all()


def test_qwen_forecast_step_is_the_blocks_applied_one_by_one(make_args):
    """Oracle as for FLUX (test_caching.py): each Qwen block adds img_gate1 * attention forecast and img_gate2 * MLP
    forecast to the image stream, gates from its img_mod(temb); the one-sum form with stacked gate rows agrees."""
    args = validate_args(make_args(*QWEN, "--disable_bf16", "--cache_mode", "hicache", "--interval", "3"))
    pipe = optimize(load_pipeline(args), args)
    pipe.transformer.double()
    cache = pipe.transformer.harness_cache
    dim, tokens = 32, 64
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, tokens, dim, dtype=torch.float64, generator=g)
    temb = torch.randn(2, dim, dtype=torch.float64, generator=g)
    orders = [torch.randn(4, 2, tokens, dim, dtype=torch.float64, generator=g) for _ in range(3)]
    coeffs = torch.tensor(forecast_coefficients("hicache", 2, 3, 0.6), dtype=torch.float64)
    expected, slot = hidden.clone(), 0
    for block in cache.double_blocks:
        chunks = block.img_mod(temb).chunk(6, dim=-1)
        for gate in (chunks[2], chunks[5]):
            expected = expected + gate.unsqueeze(1) * predict([o[slot] for o in orders], coeffs)
            slot += 1
    with torch.no_grad():
        got = forecast_image_stream(hidden, temb, coeffs, *cache._gate_rows(torch.float64), orders)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


def test_fa3_qwen_processor_equals_diffusers_processor(make_args):
    """The FA3 processor for Qwen-Image keeps diffusers' projections, norms and RoPE and swaps the kernel; on CPU the
    FA3 op runs SDPA, so it must give diffusers' native attention bitwise."""
    from utils.attention import FA3QwenAttnProcessor

    pipe, reference = generate(make_args, *QWEN, steps=4)
    pipe.transformer.set_attn_processor(FA3QwenAttnProcessor())
    _, swapped = generate(make_args, *QWEN, steps=4, pipe=pipe)
    assert torch.equal(swapped, reference)


def test_qwen_step_graphs_key_on_img_shapes_and_reproduce_the_image(make_args, monkeypatch):
    """The step graphs' forward for Qwen-Image takes its tensors and img_shapes (a value, part of each graph's key);
    a stand-in recording whose replay reruns the forward gives the eager image (as test_step_graphs.py does for
    FLUX's dense step: the stand-in runs a step twice, which a cache's in-place update would not survive)."""
    from test_step_graphs import _rerunning_record

    from utils.step_graphs import StepGraphs, participants_of

    pipe, reference = generate(make_args, *QWEN, steps=3)
    monkeypatch.setattr(StepGraphs, "_record", _rerunning_record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    participants, clock, _ = participants_of(pipe.transformer)
    graphs = StepGraphs(compile_utils.tensor_forward(pipe.transformer), participants, clock, pipe.transformer.device)
    compile_utils.install_compiled_forward(pipe.transformer, graphs, what="test")
    _, graphed = generate(make_args, *QWEN, steps=3, pipe=pipe)
    torch.testing.assert_close(graphed, reference, rtol=0, atol=0)
    assert graphs.calls == {"eager": 1, "captured": 1, "replayed": 1}
    (shapes, _), *_ = graphs.graphs
    assert ("img_shapes", repr([[(1, 8, 8)]])) in shapes


def test_qwen_refusals_name_the_layer(make_args, monkeypatch):
    with pytest.raises(StackError, match="Chipmunk is wired into FLUX's blocks"):
        validate_args(make_args(*QWEN, "--chipmunk_config", str(ROOT / "configs/chipmunk-tiny.yml")))
    with pytest.raises(StackError, match="not guidance-distilled"):
        validate_args(make_args(*QWEN, "--guidance_scale", "3.5"))
    with pytest.raises(StackError, match="needs magnitude ratios calibrated.*For Qwen-Image give mag_ratios"):
        validate_args(make_args(*QWEN, "--cache_mode", "diffusers_magcache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(StackError, match="export_aoti builds FLUX's block kinds"):
        validate_args(make_args(*QWEN, "--device", "cuda", "--compile_export_mode", "export_aoti"))
    args = validate_args(make_args(*QWEN, "--device", "cuda"))
    assert args.compile_export_mode == "compile"  # the default on a GPU (FLUX's is export_aoti)


# --- FLUX.1-Kontext ------------------------------------------------------------------------------------------

KONTEXT = ("--ckpt", "tiny:flux-kontext", "--device", "cpu", "--disable_bf16")


def test_kontext_edits_an_image_through_gen_image_and_run_benchmark(tmp_path, capsys):
    image = str(EDITS / "gradient.png")
    out = tmp_path / "edited.png"
    gen_image.main([*KONTEXT, "--image", image, "--prompt", "make it blue", "--output-file", str(out)])
    with Image.open(out) as edited:
        assert edited.size == (64, 64) and edited.text["image"] == image
    record = run_benchmark.main([*KONTEXT, "--image", image, "--num_runs", "2", "--warmup_runs", "0",
                                 "--results_dir", str(tmp_path), "--cache_mode", "hicache", "--interval", "2"])
    assert record["input_image"] == image and record["latency_s"]["n"] == 2
    # Kontext appends the input image's 256 tokens to the 256 of the latent: twice the FLOPs of text-to-image
    assert record["stack"]["feature_cache"].startswith("applied: hicache")
    for argv, message in (([*KONTEXT], "edits an image: pass --image"),
                          ([*KONTEXT, "--image", str(tmp_path / "none.png")], "no such file"),
                          (["--ckpt", "tiny", "--image", image], "--image is for FLUX.1-Kontext")):
        with pytest.raises(SystemExit):
            gen_image.main([*argv, "--output-file", str(out)])
        assert message in capsys.readouterr().err


def test_kontext_editing_sweep_per_prompt_images_and_one_shared_image(tmp_path):
    raw = {"output_dir": str(tmp_path / "edits"), "baseline": "none",
           "base": {"ckpt": "tiny:flux-kontext", "disable_bf16": True, "num_inference_steps": 4},
           "variants": [{"name": "none"}, {"name": "hicache", "flags": {"cache_mode": "hicache", "interval": 2,
                                                                         "first_enhance": 1}}],
           "prompts": {"spec": f"edits:{EDITS / 'edits.tsv'}"}, "warmup_runs": 0, "metrics": ["psnr"]}
    config = tmp_path / "edits.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert run_ablation.main(["--config", str(config)]) == 0
    records = [json.loads(line) for line in (tmp_path / "edits/records.jsonl").read_text().splitlines()]
    assert {Path(r["input_image"]).name for r in records} == {"gradient.png", "square.png"}
    assert all("--image" in r["reproduce"] for r in records)
    table = pd.read_csv(tmp_path / "edits/summary.csv").set_index("variant")
    assert (table["status"] == "ok").all() and table.loc["hicache", "forecast_steps"] == 2
    shared = {**raw, "output_dir": str(tmp_path / "shared"), "input_image": str(EDITS / "square.png")}
    config.write_text(yaml.safe_dump(shared))  # --prompts replaces the edits file: the shared image for each prompt
    assert run_ablation.main(["--config", str(config), "--no_metrics", "--prompts", "default",
                              "--limit_prompts", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "shared/records.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["input_image"] for r in records} == {str(EDITS / "square.png")}
    missing = {**raw, "prompts": {"spec": "default", "limit": 1}}
    config.write_text(yaml.safe_dump(missing))
    with pytest.raises(SystemExit) as err:
        run_ablation.main(["--config", str(config)])
    assert err.value.code == 2


def test_input_images_are_refused_where_they_do_not_belong(tmp_path, make_args, capsys):
    config = tmp_path / "t2i.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "baseline": "none",
                                      "base": {"ckpt": "tiny"}, "variants": [{"name": "none"}],
                                      "prompts": {"spec": "default", "limit": 1},
                                      "input_image": str(EDITS / "square.png")}))
    with pytest.raises(SystemExit):
        run_ablation.main(["--config", str(config)])
    assert "input images are for FLUX.1-Kontext" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--image is for FLUX.1-Kontext"):
        check_args(make_args("--image", str(EDITS / "square.png")))

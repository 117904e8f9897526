"""Other libraries' caches as --cache_mode choices (utils/peer_caches.py) on the tiny pipeline (CPU, fp32): where a
peer implements our method, how far they agree (FBCache against diffusers' FirstBlockCache: the same skip decisions
and bitwise the same images; TaylorSeer at interval 1: bitwise no cache); every diffusers hook runs through
optimize() and reports full/cached steps and FLOPs; the refusals; regional compile with graph breaks; the zoo sweep
as CI's smoke run."""

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import run_ablation
from utils.benchmark_utils import PEER_CACHE_MODES, pipeline_call_kwargs
from utils.errors import LibraryLimitation
from utils.pipeline_utils import StackError, load_pipeline, optimize, validate_args

ROOT = Path(__file__).resolve().parents[1]


def generate(make_args, *flags, steps=12, pipe=None, seed=0):
    args = validate_args(make_args("--disable_bf16", "--num_inference_steps", str(steps), *flags))
    if pipe is None:
        pipe = optimize(load_pipeline(args), args)
    images = pipe(**pipeline_call_kwargs(args), output_type="pt", generator=torch.Generator().manual_seed(seed)).images
    return pipe, images


# --- equivalences -------------------------------------------------------------------------------------------

def test_fbcache_and_diffusers_first_block_cache_take_the_same_decisions_and_give_the_same_images(make_args):
    """The same method (ALGORITHMS.md 2): block 0's relative residual change against the last computed step's, the
    other blocks skipped below the threshold and their residual reused. At equal thresholds the skip decisions are
    the same at every step and the images bitwise equal (measured: max |difference| 0.0 at every threshold); the
    FLOPs speedups agree to rounding. diffusers' decision reads `diff > threshold` for compute, ours
    `change < threshold` for skip: they differ only at exact equality."""
    mixed = 0
    for threshold in ("0.05", "0.3", "0.5", "1.0"):
        ours, a = generate(make_args, "--cache_mode", "fbcache", "--fbcache_threshold", threshold)
        peer, b = generate(make_args, "--cache_mode", "diffusers_fbc", "--fbcache_threshold", threshold)
        mine, theirs = ours.transformer.harness_cache.stats(), peer.transformer.harness_cache.stats()
        assert mine["step_kinds"] == theirs["step_kinds"], threshold
        assert torch.equal(a, b), threshold
        assert theirs["flops_speedup"] == pytest.approx(mine["flops_speedup"], rel=1e-12)
        mixed += "F" in theirs["step_kinds"][1:] and "c" in theirs["step_kinds"]
        # a later generation's decisions come from diffusers' own state (should_compute), not from counting
        _, again = generate(make_args, "--cache_mode", "diffusers_fbc", "--fbcache_threshold", threshold, pipe=peer)
        assert peer.transformer.harness_cache.stats()["step_kinds"] == theirs["step_kinds"]
        assert torch.equal(again, b)
    assert mixed >= 2  # thresholds where some steps skip and some do not (FcFcFcFFcFFF, FcccccccccFc)


@pytest.mark.parametrize("mode", ["diffusers_taylorseer", "diffusers_taylorseer_lite"])
def test_diffusers_taylorseer_at_interval_one_is_bitwise_no_cache(make_args, mode):
    """diffusers' schedule computes a step when (s - before - 1) % interval == 0: with interval 1 every step, so its
    hooks return the modules' own outputs; like ours at interval 1 (test_caching.py), bitwise no cache."""
    _, reference = generate(make_args, steps=8)
    pipe, cached = generate(make_args, "--cache_mode", mode, "--interval", "1", steps=8)
    stats = pipe.transformer.harness_cache.stats()
    assert torch.equal(reference, cached)
    assert stats["step_kinds"] == "F" * 8 and stats["flops_speedup"] == pytest.approx(1.0)


# --- every hook through optimize() ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", PEER_CACHE_MODES)
def test_every_diffusers_hook_runs_and_reports_steps_and_flops_like_ours(make_args, mode):
    """Applied by diffusers (enable_cache), counted without changing the computation: a second generation gives
    the same image; step kinds cover every step; the FLOPs speedup is dense FLOPs over the counted ones per kind."""
    flags = ("--cache_mode", mode, "--interval", "3", "--first_enhance", "2", "--fbcache_threshold", "0.3")
    pipe, first = generate(make_args, *flags, steps=10)
    stats = pipe.transformer.harness_cache.stats()
    _, second = generate(make_args, *flags, steps=10, pipe=pipe)
    assert torch.equal(first, second)  # the hooks' state resets per generation (diffusers' maybe_free_model_hooks)
    assert pipe.transformer.harness_cache.stats()["step_kinds"] == stats["step_kinds"]
    assert pipe.harness_stack["feature_cache"].startswith("applied: diffusers 0.42.1 ")
    assert len(stats["step_kinds"]) == 10 and stats["full_steps"] + stats["forecast_steps"] == 10
    assert stats["forecast_steps"] >= 2 and stats["step_kinds"][0] == "F"
    kinds = stats["computed_modules_per_step"]
    per_kind = {int(k): v for k, v in stats["flops_per_step_kind"].items()}
    full = per_kind[stats["hooked_modules"]]
    assert stats["flops_full_step"] == full and all(per_kind[k] < full for k in per_kind if k != max(per_kind))
    assert stats["flops_speedup"] == pytest.approx(10 * full / sum(per_kind[k] for k in kinds), rel=1e-12)
    assert stats["flops_speedup"] > 1.0 and stats["flops_note"] is None
    _, reference = generate(make_args, steps=10)
    assert 0 < (first - reference).abs().mean() < 0.02  # images in [0, 1]


def test_schedules_match_diffusers_documented_rules(make_args):
    """The step kinds the probe counts are the hooks' own rules: TaylorSeer computes s < 3 and (s - 4) % 5 == 0
    (steps 0, 1, 2, 4, 9 of 12: step 3 is forecast, unlike ours, which computes 0, 1, 2, 7); PAB computes every 2nd
    call while 100 < t < 800 and every call outside."""
    pipe, _ = generate(make_args, "--cache_mode", "diffusers_taylorseer", "--interval", "5", "--first_enhance", "3")
    assert pipe.transformer.harness_cache.stats()["step_kinds"] == "FFFcFccccFcc"
    pipe, _ = generate(make_args, "--cache_mode", "taylor", "--interval", "5", "--first_enhance", "3")
    assert pipe.transformer.harness_cache.stats()["step_kinds"] == "FFFccccFcccc"
    pipe, _ = generate(make_args, "--cache_mode", "diffusers_pab")
    timesteps = pipe.scheduler.timesteps.tolist()
    kinds = pipe.transformer.harness_cache.stats()["step_kinds"]
    expected = ""
    for i, t in enumerate(timesteps):
        compute = i == 0 or not 100 < t < 800 or i % 2 == 0
        expected += "F" if compute else "c"
    assert kinds == expected


# --- the YAML and the refusals ----------------------------------------------------------------------------------

def test_peer_cache_config_yaml_fills_the_config_and_bad_keys_name_the_fix(make_args, tmp_path):
    good = tmp_path / "pab.yaml"
    good.write_text("cache_mode: diffusers_pab\nspatial_attention_block_skip_range: 3\n"
                    "spatial_attention_timestep_skip_range: [0, 1000]\n")
    pipe, _ = generate(make_args, "--cache_mode", "diffusers_pab", "--peer_cache_config", str(good), steps=7)
    assert "spatial_attention_block_skip_range=3" in pipe.harness_stack["feature_cache"]
    assert pipe.transformer.harness_cache.stats()["step_kinds"] == "FccFccF"
    for text, flags, message in (
            ("threshhold: 0.1\n", ("--cache_mode", "diffusers_fbc"), "unknown key 'threshhold'.*did you mean 'threshold'"),
            ("cache_mode: diffusers_pab\n", ("--cache_mode", "diffusers_fbc"), "is for --cache_mode diffusers_pab"),
            ("cache_interval: 4\n", ("--cache_mode", "diffusers_taylorseer", "--interval", "6"), "set it in one place"),
            ("taylor_factors_dtype: double\n", ("--cache_mode", "diffusers_taylorseer"), "must be one of float32"),
            ("use_lite_mode: true\n", ("--cache_mode", "diffusers_taylorseer"), "diffusers_taylorseer_lite"),
            ("is_guidance_distilled: false\n", ("--cache_mode", "diffusers_fastercache"), "one transformer call"),
            ("num_inference_steps: 28\n", ("--cache_mode", "diffusers_magcache"), "differs from --num_inference_steps"),
            ("threshold: -1\n", ("--cache_mode", "diffusers_magcache"), "threshold must be >= 0")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(StackError, match=message):
            validate_args(make_args(*flags, "--peer_cache_config", str(bad)))
    with pytest.raises(ValueError, match="--peer_cache_config configures a diffusers cache"):
        from utils.benchmark_utils import check_args

        check_args(make_args("--cache_mode", "taylor", "--peer_cache_config", str(good)))


def test_refusals_name_the_reason(make_args, monkeypatch):
    tiny_chipmunk = str(ROOT / "configs/chipmunk-tiny.yml")
    with pytest.raises(LibraryLimitation, match="cannot run with Chipmunk"):
        validate_args(make_args("--cache_mode", "diffusers_pab", "--chipmunk_config", tiny_chipmunk))
    with pytest.raises(LibraryLimitation, match="MagCache hooks run each block's whole forward under torch.compiler"):
        validate_args(make_args("--cache_mode", "diffusers_magcache", "--compile_export_mode", "compile"))
    with pytest.raises(LibraryLimitation, match="calls its transformer outside any"):
        validate_args(make_args("--ckpt", "tiny:flux-kontext", "--cache_mode", "diffusers_taylorseer",
                                "--image", str(ROOT / "tests/fixtures/edits/square.png")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU-only combinations, refused the same way
    with pytest.raises(LibraryLimitation, match="export_aoti cannot hold --cache_mode diffusers_fbc"):
        validate_args(make_args("--device", "cuda", "--cache_mode", "diffusers_fbc",
                                "--compile_export_mode", "export_aoti"))
    with pytest.raises(LibraryLimitation, match="replays recorded CUDA graphs, which run no Python"):
        validate_args(make_args("--device", "cuda", "--cache_mode", "diffusers_taylorseer",
                                "--compile_export_mode", "compile", "--compile_mode", "reduce-overhead"))
    args = validate_args(make_args("--device", "cuda", "--cache_mode", "diffusers_magcache"))
    assert args.compile_export_mode == "disabled"  # MagCache's default on a GPU: eager, not refused


def test_regional_compile_breaks_the_graph_where_the_hooks_decide_and_matches_eager(make_args):
    """Under dynamo (backend eager: tracing without inductor) a block with diffusers' hooks cannot be one graph; with
    fullgraph=False it compiles around the hooks, gives the eager image and the same step kinds (read from
    diffusers' state and the counted schedule: nothing counted inside compiled code)."""
    from torch._dynamo.utils import counters

    for mode, message in (("diffusers_fbc", "torch.compiler.disable"), ("diffusers_pab", "Data-dependent branching")):
        eager, reference = generate(make_args, "--cache_mode", mode, "--fbcache_threshold", "0.3", steps=6)
        kinds = eager.transformer.harness_cache.stats()["step_kinds"]
        torch._dynamo.reset()
        pipe, _ = generate(make_args, "--cache_mode", mode, "--fbcache_threshold", "0.3", steps=6)
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
        with pytest.raises(Exception, match=message):
            generate(make_args, "--cache_mode", mode, "--fbcache_threshold", "0.3", steps=6, pipe=pipe)
        torch._dynamo.reset()
        pipe, _ = generate(make_args, "--cache_mode", mode, "--fbcache_threshold", "0.3", steps=6)
        pipe.transformer.compile_repeated_blocks(fullgraph=False, backend="eager")
        counters.clear()
        _, compiled = generate(make_args, "--cache_mode", mode, "--fbcache_threshold", "0.3", steps=6, pipe=pipe)
        assert sum(counters["graph_break"].values()) > 0 and counters["stats"]["unique_graphs"] > 0
        torch.testing.assert_close(compiled, reference, rtol=0, atol=1e-6)
        assert pipe.transformer.harness_cache.stats()["step_kinds"] == kinds
    torch._dynamo.reset()


# --- the zoo ----------------------------------------------------------------------------------------------------

def test_caching_zoo_runs_on_the_tiny_pipeline_with_every_variant_in_the_table(tmp_path):
    """CI's smoke run of configs/ablations/caching_zoo.yaml (the command in its header): every variant has a row;
    a library that cannot run one lists it as failed with the library's own reason (cache-dit's DBCache F8B0 wants
    more than 8 blocks; the tiny FLUX has 6); a Pareto plot per quality metric; the CLIP model is named."""
    out = tmp_path / "zoo"
    config = ROOT / "configs/ablations/caching_zoo.yaml"
    argv = ["--config", str(config), "--output_dir", str(out), "--limit_prompts", "1", "--metrics_random_init",
            "--base", "ckpt=tiny", "--base", "disable_bf16=true", "--base", "height=64", "--base", "width=64",
            "--base", "num_inference_steps=12", "--base", "compile_export_mode=disabled"]
    assert run_ablation.main(argv) == 0
    table = pd.read_csv(out / "summary.csv").set_index("variant")
    names = [v["name"] for v in yaml.safe_load(config.read_text())["variants"]]
    assert list(table.index) == names and len(names) == 20
    failed = table[table["status"] != "ok"]
    assert list(failed.index) == ["cachedit_F8B0"]
    assert "Fn_compute_blocks 8 must be less than the number of transformer blocks 6" in failed.loc["cachedit_F8B0",
                                                                                                     "status"]
    ok = table[table["status"] == "ok"]
    assert (ok["images"] == 1).all() and ok[["speedup", "full_steps", "forecast_steps"]].notna().all().all()
    peers = [n for n in names if n.startswith("diffusers_") and n != "diffusers_fbc"]
    assert (table.loc[peers, "forecast_steps"] > 0).all() and (table.loc[peers, "flops_speedup"] > 1).all()
    # at threshold 0.08 the tiny model's residual always moves more: neither FBCache skips a step
    assert table.loc["diffusers_fbc", "forecast_steps"] == table.loc["fbcache", "forecast_steps"] == 0
    assert table.loc["hicache_N5", "forecast_steps"] == 8  # 12 steps: full 0, 1, 2, 7
    assert (table["clip_model"] == "ViT-L-14").all()
    for metric in ("psnr", "ssim", "lpips", "fid", "clip", "image_reward"):
        assert (out / f"pareto_{metric}.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "CLIP score ViT-L-14" in summary and "column Images: N per variant" in summary
    records = [r for r in map(eval_json, (out / "records.jsonl").read_text().splitlines())]
    cache_dit = next(r for r in records if r["variant"] == "cachedit_F1B0_taylorseer")
    assert cache_dit["flops"] is None and "module tracker" in cache_dit["cache_stats"]["flops_note"]


def eval_json(line):
    import json

    return json.loads(line)

"""run_ablation.py end to end on the tiny pipeline (CPU): the smoke config's files and columns, shards +
merge, torchrun with gloo, resume after SIGKILL, failing variants, weight reuse, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import run_ablation
from utils import sweep

ROOT = Path(__file__).resolve().parents[1]
# One thread: the 2-core CI box is shared, and two spinning OpenMP threads per process slow it ~5x.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(tmp_path, variants=None, prompts=2, metrics=(), **extra) -> Path:
    raw = {"output_dir": str(tmp_path / "out"), "base": {"ckpt": "tiny", "disable_bf16": True, "num_inference_steps": 2,
                                                          "first_enhance": 1, "interval": 2},
           "baseline": "none", "variants": variants or [{"name": "none"}, {"name": "taylor", "flags": {"cache_mode": "taylor"}}],
           "prompts": {"spec": "default", "limit": prompts}, "seeds_per_prompt": 1, "warmup_runs": 0,
           "metrics": list(metrics), **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def ok_records(out: Path) -> list[dict]:
    return [r for r in sweep.read_all_records(out) if r["status"] == "ok"]


def test_smoke_config_writes_every_table_and_plot(tmp_path):
    out = tmp_path / "smoke"
    assert run_ablation.main(["--config", str(ROOT / "configs/ablations/smoke.yaml"), "--output_dir", str(out)]) == 0
    table = pd.read_csv(out / "summary.csv").set_index("variant")
    assert list(table.index) == ["none", "fora", "taylor", "hicache", "no_qkv_fusion"]
    assert (table["status"] == "ok").all() and (table["images"] == 4).all()
    for column in ("latency_s_mean", "latency_s_std", "speedup", "flops_speedup", "denoise_s_mean", "full_steps",
                   "forecast_steps", "tflops_per_image", "peak_memory_gb", "fid", "lpips_mean", "lpips_std",
                   "psnr_mean", "psnr_std", "ssim_mean", "ssim_std", "clip_mean", "clip_std", "image_reward_mean",
                   "image_reward_std"):
        assert column in table.columns, column
    assert table.loc["none", "speedup"] == 1.0 and table.loc["none", "forecast_steps"] == 0
    # 8 steps, first_enhance 2, interval 3: full steps 0, 1, 4, 7
    assert table.loc["taylor", "full_steps"] == 4 and table.loc["hicache", "forecast_steps"] == 4
    assert table.loc["taylor", "flops_speedup"] > 1.5
    assert table.loc[["fora", "taylor", "hicache", "no_qkv_fusion"], ["psnr_mean", "ssim_mean", "lpips_mean", "fid"]].notna().all().all()
    assert table[["clip_mean", "image_reward_mean"]].notna().all().all()
    for name in ("summary.md", "summary.tex", "samples_grid.png", "samples_grid.pdf", "latency_breakdown.png",
                 "latency_breakdown.pdf", "records.jsonl", "metrics.jsonl", "timing.json", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    for metric in ("psnr", "ssim", "lpips", "fid", "clip", "image_reward"):
        assert (out / f"pareto_{metric}.png").exists() and (out / f"pareto_{metric}.pdf").exists()
    record = json.loads((out / "records.jsonl").read_text().splitlines()[0])
    for key in ("prompt", "seed", "latency_s", "denoise_s", "full_steps", "forecast_steps", "flops", "peak_memory_gb",
                "flags", "environment", "reproduce"):
        assert key in record, key
    assert record["reproduce"].startswith("python gen_image.py --ckpt tiny")
    assert "wall / sum of latencies" in (out / "summary.md").read_text()


def test_shards_then_merge(tmp_path):
    config = small_config(tmp_path, prompts=3, metrics=["psnr"])
    out = tmp_path / "out"
    assert run_ablation.main(["--config", str(config), "--shard", "0/2"]) == 0
    assert not (out / "summary.csv").exists()  # a shard only generates
    assert run_ablation.main(["--config", str(config), "--merge"]) == 0
    partial = pd.read_csv(out / "summary.csv").set_index("variant")
    assert partial.loc["taylor", "status"] == "incomplete (2/3)"  # prompts 0 and 2 of 3
    assert run_ablation.main(["--config", str(config), "--shard", "1/2"]) == 0
    assert run_ablation.main(["--config", str(config), "--merge"]) == 0
    table = pd.read_csv(out / "summary.csv").set_index("variant")
    assert (table["status"] == "ok").all() and (table["images"] == 3).all()
    shard_keys = [{r["key"] for r in sweep.read_jsonl(out / f"records/shard-{i}-of-2.jsonl")} for i in range(2)]
    assert not shard_keys[0] & shard_keys[1] and len(shard_keys[0] | shard_keys[1]) == 6
    assert table.loc["taylor", "psnr_mean"] > 0


def test_torchrun_two_ranks_split_the_work_and_rank0_reports(tmp_path):
    config = small_config(tmp_path, prompts=2)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(ROOT / "run_ablation.py"), "--config", str(config)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=240)  # --standalone: a free port
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [[r["key"] for r in sweep.read_jsonl(out / f"records/shard-{i}-of-2.jsonl")] for i in range(2)]
    assert sorted(per_rank[0]) == ["none/p0000_s0", "taylor/p0000_s0"]
    assert sorted(per_rank[1]) == ["none/p0001_s0", "taylor/p0001_s0"]
    table = pd.read_csv(out / "summary.csv")
    assert list(table["status"]) == ["ok", "ok"] and list(table["images"]) == [2, 2]


def test_resume_after_sigkill_regenerates_nothing_and_loses_no_record(tmp_path):
    config = small_config(tmp_path, prompts=5)
    out = tmp_path / "out"
    records_file = out / "records/shard-0-of-1.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_ablation.py"), "--config", str(config)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if records_file.exists() and records_file.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r["key"]: r for r in ok_records(out)}
    assert 3 <= len(before) < 10, "the kill should land mid-sweep"
    with records_file.open("a") as f:
        f.write('{"key": "taylor/p0004_s0", "status": "ok", "lat')  # as if killed in the middle of a write
    mtimes = {key: (out / r["image"]).stat().st_mtime_ns for key, r in before.items()}

    assert run_ablation.main(["--config", str(config)]) == 0
    after = ok_records(out)
    keys = [r["key"] for r in after]
    assert sorted(set(keys)) == sorted(it.key for it in sweep.work_list(sweep.load_config(config), 5))
    assert len(keys) == len(set(keys)), "a finished image was generated twice"
    assert all((out / before[k]["image"]).stat().st_mtime_ns == mtimes[k] for k in before)
    assert all(json.loads(line) for line in records_file.read_text().splitlines())  # torn line was cut
    assert list(pd.read_csv(out / "summary.csv")["status"]) == ["ok", "ok"]


def test_failing_variants_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    config = small_config(tmp_path, variants=[
        {"name": "none"}, {"name": "aoti", "flags": {"compile_export_mode": "export_aoti"}},  # needs CUDA
        {"name": "oom", "flags": {"cache_mode": "fora"}}, {"name": "taylor", "flags": {"cache_mode": "taylor"}}])
    real_generate = sweep.generate_image

    def generate(pipeline, args, prompt, seed):
        if args.cache_mode == "fora":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_generate(pipeline, args, prompt, seed)

    monkeypatch.setattr(sweep, "generate_image", generate)
    assert run_ablation.main(["--config", str(config)]) == 0
    table = pd.read_csv(tmp_path / "out/summary.csv").set_index("variant")
    assert table.loc["aoti", "status"].startswith("failed: StackError: --compile_export_mode export_aoti needs CUDA")
    assert table.loc["oom", "status"].startswith("failed: OutOfMemoryError: CUDA out of memory")
    assert table.loc["none", "status"] == "ok" and table.loc["taylor", "status"] == "ok"
    assert table.loc["taylor", "images"] == 2 and table.loc["oom", "images"] == 0


def test_weights_are_reused_only_after_a_variant_that_left_the_transformer_untouched(tmp_path, monkeypatch):
    from utils import pipeline_utils

    loads = []
    real_load = pipeline_utils.load_pipeline
    monkeypatch.setattr(pipeline_utils, "load_pipeline", lambda args: loads.append(args.ckpt) or real_load(args))
    unfused = {"disable_fused_projections": True}
    config = small_config(tmp_path, prompts=1, variants=[
        {"name": "none", "flags": unfused}, {"name": "unfused_again", "flags": unfused},  # reuses
        {"name": "fused"},  # reuses (the previous left it pristine), then fuses QKV
        {"name": "unfused_3", "flags": unfused}])  # must reload
    assert run_ablation.main(["--config", str(config), "--no_metrics"]) == 0
    assert len(loads) == 2
    records = {r["variant"]: r for r in ok_records(tmp_path / "out")}
    assert records["fused"]["stack"]["qkv_fusion"] == "applied"
    assert records["unfused_3"]["stack"]["qkv_fusion"].startswith("skipped")


def test_bad_config_stops_before_any_image(tmp_path, capsys):
    config = small_config(tmp_path, variants=[{"name": "none"}, {"name": "x", "flags": {"disable_fa33": True}}])
    with pytest.raises(SystemExit) as err:
        run_ablation.main(["--config", str(config)])
    assert err.value.code == 2
    assert "variant 'x': unknown flag 'disable_fa33' (did you mean 'disable_fa3'?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_metric_weights_download_flag_and_missing_weights_error(tmp_path, monkeypatch, capsys):
    from utils import metrics

    fetched = []
    monkeypatch.setattr(metrics, "download_metric_weights", fetched.append)
    assert run_ablation.main(["--download-metric-weights", str(tmp_path / "w")]) == 0
    assert fetched == [str(tmp_path / "w")]
    config = small_config(tmp_path, metrics=["lpips"])  # real weights wanted, none given
    with pytest.raises(SystemExit):
        run_ablation.main(["--config", str(config)])
    assert "--download-metric-weights DIR" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

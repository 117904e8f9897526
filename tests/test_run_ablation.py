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

    def generate(pipeline, args, prompt, seed, image=None):
        if args.cache_mode == "fora":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_generate(pipeline, args, prompt, seed, image)

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


# --- reliability: kills, concurrent shards, full and read-only folders, bad input ---------------------

THIRD_PARTY_NOISE = ("register_constant", "Unable to import `torchao`", "Token indices sequence length",
                     "part of your input was truncated", "'pretrained' is deprecated", "weight enum",
                     "No pretrained weights loaded", "[stack]")
QUALITY = ["status", "images", "psnr_mean", "psnr_std", "lpips_mean", "lpips_std", "full_steps", "forecast_steps"]


def sweep_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_ablation.py"), "--config", str(config), *extra]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """SIGKILL `proc` as soon as ready() holds; False if it ended first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


def test_sweep_survives_sigkill_at_random_moments(tmp_path):
    """Kills at random moments of generation, metrics and reports, each run resuming the last one's folder,
    then a final run: the summary's quality columns equal an uninterrupted run's, and no image was generated
    twice. The uninterrupted run also shows what the console prints."""
    import random

    config = small_config(tmp_path, prompts=2, metrics=["psnr", "lpips"], metrics_random_init=True,
                          report={"grid_prompts": 1})
    env = {**ENV, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    started = time.time()
    with (tmp_path / "reference.err").open("w") as err:
        proc = subprocess.Popen(sweep_command(config, "--output_dir", str(reference)), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        out = []
        for line in proc.stdout:
            out.append(line)
            if line.startswith("[sweep] shard"):
                marker = time.time()
        assert proc.wait() == 0
    active = time.time() - marker  # generation, metrics and reports: where the kills land
    console = "".join(out) + (tmp_path / "reference.err").read_text()
    for noise in THIRD_PARTY_NOISE:
        assert noise not in console, noise
    for bar in ("generation: 100%", "metrics: 100%", "reports: 100%"):
        assert bar in console, bar
    assert console.count("[load] tiny: miniature FLUX with RANDOM WEIGHTS") == 1
    assert started < marker

    out_dir = tmp_path / "out"
    records_file = out_dir / "records/shard-0-of-1.jsonl"
    moments = [("generation", lambda: records_file.exists() and records_file.read_text().count("\n") >= 1),
               ("after", random.Random(1234).uniform(0, active)),  # seconds after generation starts
               ("metrics", lambda: any((out_dir / "metrics").glob("*.json"))),  # one variant's metrics written
               ("reports", lambda: (out_dir / "summary.csv").exists())]  # the first report file written
    landed = []
    for kind, when in moments:
        proc = subprocess.Popen(sweep_command(config), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        if kind == "after":
            for line in proc.stdout:
                if line.startswith("[sweep] shard"):
                    break
            t0 = time.time()
            killed = kill_when(proc, lambda: time.time() - t0 >= when)
        else:
            killed = kill_when(proc, when)
        proc.stdout.close()
        landed.append((kind, killed, len(ok_records(out_dir)) if (out_dir / "records").exists() else 0))
    assert run_ablation.main(["--config", str(config)]) == 0, landed

    final = pd.read_csv(out_dir / "summary.csv").set_index("variant")
    expected = pd.read_csv(reference / "summary.csv").set_index("variant")
    pd.testing.assert_frame_equal(final[QUALITY], expected[QUALITY], check_exact=True, obj=str(landed))
    keys = [r["key"] for r in ok_records(out_dir)]
    assert len(keys) == len(set(keys)) == 4, (landed, keys)  # nothing lost, nothing generated twice
    assert [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]


def test_two_shards_at_once_into_one_folder_and_a_second_run_of_a_shard_is_refused(tmp_path):
    config = small_config(tmp_path, prompts=2)
    out = tmp_path / "out"
    shards = [subprocess.Popen(sweep_command(config, "--shard", f"{i}/2"), cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    lock = out / "records/shard-0-of-2.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
        time.sleep(0.02)
    second = subprocess.run(sweep_command(config, "--shard", "0/2"), cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=120)
    results = [(p.wait(timeout=240), p.stderr.read()) for p in shards]
    assert all(code == 0 for code, _ in results), results
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"run_ablation.py: error: output_dir {out}: shard-0-of-2 is being run by pid {shards[0].pid} on "
        f"{os.uname().nodename}; wait for it to end, or use another output_dir"]
    assert run_ablation.main(["--config", str(config), "--merge"]) == 0
    table = pd.read_csv(out / "summary.csv")
    assert list(table["status"]) == ["ok", "ok"] and list(table["images"]) == [2, 2]
    keys = [r["key"] for r in ok_records(out)]
    assert len(keys) == len(set(keys)) == 4


BAD_INPUT_SCRIPT = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import gen_image, run_ablation
results = {}
for name, argv in json.loads(sys.argv[2]).items():
    main = gen_image.main if name.startswith("gen_image") else run_ablation.main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results[name] = [code, err.getvalue()]
heavy = ("diffusers", "transformers", "utils.pipeline_utils", "torchmetrics")
results["imported"] = [m for m in heavy if m in sys.modules]
print(json.dumps(results))
"""


def test_bad_inputs_are_one_line_each_before_the_heavy_imports(tmp_path):
    good = small_config(tmp_path)
    raw = yaml.safe_load(good.read_text())
    configs = {"prompts_missing": {**raw, "prompts": {"spec": str(tmp_path / "prompts.txt")}},
               "ckpt_missing": {**raw, "base": {**raw["base"], "ckpt": "/path/that/does/not/exist"}},
               "steps_zero": {**raw, "base": {**raw["base"], "num_inference_steps": 0}}}
    cases = {}
    for name, content in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(content))
        cases[name] = ["--config", str(tmp_path / f"{name}.yaml")]
    (tmp_path / "twice.yaml").write_text(good.read_text() + "baseline: taylor\n")
    cases.update(twice=["--config", str(tmp_path / "twice.yaml")],
                 config_missing=["--config", str(tmp_path / "nope.yaml")],
                 warmup_negative=["--config", str(good), "--warmup_runs", "-1"],
                 gen_image_ckpt=["--ckpt", "/path/that/does/not/exist"],
                 gen_image_ckpt_file=["--ckpt", str(good)],
                 gen_image_output=["--ckpt", "tiny", "--output-file", str(tmp_path / "no/such/dir/cat.png")])
    result = subprocess.run([sys.executable, "-c", BAD_INPUT_SCRIPT, str(ROOT), json.dumps(cases)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.splitlines()[-1])
    assert results.pop("imported") == []  # every refusal came before diffusers, transformers and the stack
    expected = {
        "prompts_missing": "prompt file not found: " + str(tmp_path / "prompts.txt"),
        "ckpt_missing": "--ckpt /path/that/does/not/exist: no such folder",
        "steps_zero": "argument --num_inference_steps: must be an integer >= 1 (got 0)",
        "twice": "key 'baseline' appears twice",
        "config_missing": f"--config {tmp_path / 'nope.yaml'}: no such file",
        "warmup_negative": "argument --warmup_runs: must be an integer >= 0 (got -1)",
        "gen_image_ckpt": "error: --ckpt /path/that/does/not/exist: no such folder",
        "gen_image_ckpt_file": "a file, not a pipeline folder",
        "gen_image_output": f"the folder {tmp_path / 'no/such/dir'} does not exist",
    }
    for name, text in expected.items():
        code, err = results[name]
        assert code == 2 and len(err.strip().splitlines()) == 1 and text in err, (name, code, err)


def test_a_full_disk_stops_the_sweep_with_no_failed_record_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    config = small_config(tmp_path, prompts=2)
    out = tmp_path / "out"
    real_save = sweep.RecordWriter._save
    saved = []

    def fill_up(self, image, record):
        if len(saved) == 3:  # the fourth image finds the disk full
            raise sweep.OutputWriteError(f"cannot write {self.output_dir / record['image']}: No space left on device")
        saved.append(record["key"])
        real_save(self, image, record)

    monkeypatch.setattr(sweep.RecordWriter, "_save", fill_up)
    assert run_ablation.main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device; what was written is kept" in err and "Traceback" not in err
    records = sweep.read_all_records(out)
    assert [r["status"] for r in records] == ["ok"] * 3  # no variant blamed for the folder
    assert not (out / "summary.csv").exists()
    monkeypatch.setattr(sweep.RecordWriter, "_save", real_save)
    assert run_ablation.main(["--config", str(config)]) == 0
    assert len(ok_records(out)) == 4 and list(pd.read_csv(out / "summary.csv")["status"]) == ["ok", "ok"]

    import errno

    from utils import reports

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(reports, "write_text_atomic", full)  # the disk fills up while the reports are written
    capsys.readouterr()
    assert run_ablation.main(["--config", str(config), "--merge"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # beside the reports' progress bar
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("run_ablation.py: error: ")
    assert "No space left on device" in errors[0] and "rerun the same command to resume" in errors[0]


def test_a_read_only_output_dir_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import errno

    config = small_config(tmp_path)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(sweep.tempfile, "mkstemp", read_only)
    with pytest.raises(SystemExit) as err:
        run_ablation.main(["--config", str(config)])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"run_ablation.py: error: output_dir {tmp_path / 'out'}: cannot write there (Read-only file "
                     f"system); fix its permissions or free space, or pass --output_dir elsewhere"]
    assert not (tmp_path / "out/records").exists()


def test_a_failed_image_write_is_blamed_on_its_own_variant_even_the_last(tmp_path, monkeypatch):
    config = small_config(tmp_path, variants=[{"name": "none"}, {"name": "fora", "flags": {"cache_mode": "fora"}},
                                              {"name": "taylor", "flags": {"cache_mode": "taylor"}}])
    real_save = sweep.RecordWriter._save

    def bad_last_image(self, image, record):
        if record["key"] in ("fora/p0001_s0", "taylor/p0001_s0"):
            raise ValueError(f"cannot encode {record['key']}")
        real_save(self, image, record)

    monkeypatch.setattr(sweep.RecordWriter, "_save", bad_last_image)
    assert run_ablation.main(["--config", str(config)]) == 0
    table = pd.read_csv(tmp_path / "out/summary.csv").set_index("variant")
    assert table.loc["none", "status"] == "ok"
    assert table.loc["fora", "status"] == "failed: ValueError: cannot encode fora/p0001_s0"
    assert table.loc["taylor", "status"] == "failed: ValueError: cannot encode taylor/p0001_s0"


def test_a_rerun_with_another_prompt_set_regenerates_the_images_whose_prompt_changed(tmp_path):
    config = small_config(tmp_path, prompts=2)
    out = tmp_path / "out"
    assert run_ablation.main(["--config", str(config), "--no_metrics"]) == 0
    first = {r["key"]: r for r in ok_records(out)}
    assert run_ablation.main(["--config", str(config), "--no_metrics", "--limit_prompts", "3"]) == 0
    prompts = sweep.load_sweep_prompts(sweep.load_config(config, prompt_limit=3, check_machine=False))
    merged = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(merged) == 6 and all(r["prompt"] == prompts[r["prompt_index"]]["prompt"] for r in merged)
    kept = [r["key"] for r in merged if r["key"] in first and first[r["key"]]["prompt"] == r["prompt"]]
    for r in merged:  # kept where the prompt is the same, generated again where it changed
        assert (r["key"] in kept) == (r["key"] in first and r == first[r["key"]]), r["key"]
    assert len(kept) < len(first)  # the seeded sample of 3 is not the sample of 2 plus one

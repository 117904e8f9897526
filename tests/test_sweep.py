"""utils/sweep.py without generating images: config validation, the work list and its shards, JSONL
records (torn lines), merge status, FLOP counts from the caching layer, the output folder's checks and
locks, the metrics cache."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from utils import sweep

ROOT = Path(__file__).resolve().parents[1]

SMALL = {"output_dir": "OUT", "base": {"ckpt": "tiny", "disable_bf16": True, "num_inference_steps": 2},
         "baseline": "none", "variants": [{"name": "none"}, {"name": "taylor", "flags": {"cache_mode": "taylor"}}],
         "prompts": {"spec": "default", "limit": 3}, "seeds_per_prompt": 2}


def write_config(tmp_path, **changes):
    raw = {**SMALL, "output_dir": str(tmp_path / "out"), **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_valid_config_resolves_each_variant_command_line(tmp_path):
    config = sweep.load_config(write_config(tmp_path), base_overrides=["num_inference_steps=3"])
    assert [v.name for v in config.variants] == ["none", "taylor"]
    assert config.variant("taylor").argv == ["--ckpt", "tiny", "--disable_bf16", "--num_inference_steps", "3",
                                             "--cache_mode", "taylor"]
    assert config.seeds == [0, 1] and config.prompt_limit == 3 and config.variant("none").stack_error is None


@pytest.mark.parametrize("changes, message", [
    ({"variantz": []}, "unknown key 'variantz' (did you mean 'variants'?)"),
    ({"variants": [{"name": "none", "flags": {"cache_mod": "taylor"}}]}, "variant 'none': unknown flag 'cache_mod' (did you mean 'cache_mode'?)"),
    ({"variants": [{"name": "none", "flags": {"cache_mode": "magic"}}]}, "invalid choice: 'magic'"),
    ({"variants": [{"name": "none", "flags": {"interval": "often"}}]}, "invalid int value: 'often'"),
    ({"variants": [{"name": "none", "flags": {"disable_fa3": "yes"}}]}, "is a switch, give true or false"),
    ({"variants": [{"name": "none", "flagz": {}}]}, "variants[0]: unknown key 'flagz'"),
    ({"base": {"prompt": "a cat"}}, "flag 'prompt' is set by the sweep"),
    ({"baseline": "dense"}, "baseline 'dense' is not one of the variants"),
    ({"variants": [{"name": "none"}, {"name": "none"}]}, "variant name 'none' appears twice"),
    ({"variants": [{"name": "has space"}]}, "a name is a folder of output_dir"),
    ({"variants": [{"name": "none"}, {"name": ".."}]}, "(got '..')"),  # would write outside output_dir
    ({"variants": [{"name": "none"}, {"name": "summary.csv"}]}, "(got 'summary.csv')"),  # would shadow a report
    ({"variants": [{"name": "none"}, {"name": "records"}]}, "not records or metrics (got 'records')"),
    ({"variants": [{"name": "none"}, {"name": "a/b"}]}, "(got 'a/b')"),
    ({"variants": [{"name": "none"}, {"name": "-x"}]}, "starting with a letter or digit"),
    ({"variants": [{"name": "none"}, {"name": 7}]}, "(got 7)"),
    ({"variants": [{"name": "none"}, {"name": "NONE"}]}, "variant name 'NONE' appears twice"),  # one folder on macOS
    ({"metrics": ["psnr", "fidd"]}, "unknown metric 'fidd'"),
    ({"report": {"pareto_metrics": ["lpips"]}}, "'lpips' is not among the config's metrics"),
    ({"interval1_check": {"tolerence": 1}}, "interval1_check: unknown key 'tolerence'"),
    # machine-independent mistakes: refused at load, not recorded as failed variants after the work
    ({"base": {"ckpt": "tiny", "num_inference_steps": 0}}, "argument --num_inference_steps: must be an integer >= 1"),
    ({"base": {"ckpt": "tiny", "height": 72}}, "multiples of 16"),
    ({"base": {"ckpt": "tiny", "max_sequence_length": 0}}, "--max_sequence_length: must be an integer from 1 to 512"),
    ({"variants": [{"name": "none", "flags": {"cache_mode": "hicache", "interval": 0}}]}, "--interval must be >= 1"),
    ({"variants": [{"name": "none", "flags": {"chipmunk_config": "configs/missing.yml"}}]},
     "--chipmunk_config configs/missing.yml: no such file"),
    ({"base": {"ckpt": "./no/such/folder"}}, "--ckpt ./no/such/folder: no such folder"),
    ({"base": {"ckpt": "random:flux-pro"}}, "unknown random architecture"),
    ({"variants": [{"name": "none"}, {"name": "ro", "flags": {"cache_mode": "fbcache", "compile_export_mode": "compile",
                                                             "compile_mode": "reduce-overhead"}}]},
     "variant 'ro': --compile_mode reduce-overhead replays recorded CUDA graphs, which cannot hold --cache_mode fbcache"),
    # types and ranges
    ({"variants": [{"name": "none", "flags": ["cache_mode", "taylor"]}]}, "variant 'none': flags must be a mapping"),
    ({"base": ["ckpt", "tiny"]}, "base must be a mapping"),
    ({"report": 5}, "report must be a mapping"),
    ({"report": {"grid_prompts": -1}}, "report.grid_prompts must be an integer >= 1 (got -1)"),
    ({"report": {"grid_prompts": True}}, "report.grid_prompts must be an integer >= 1 (got True)"),
    ({"report": {"pareto_metrics": "psnr"}, "metrics": ["psnr"]}, "report.pareto_metrics must be a list"),
    ({"output_dir": 5}, "output_dir must be a non-empty string (got 5)"),
    ({"output_dir": None}, "output_dir must be a non-empty string (got None)"),
    ({"prompts": {"spec": "default", "limit": True}}, "prompts.limit must be an integer >= 1 (got True)"),
    ({"prompts": 5}, "prompts must be a mapping"),
    ({"metrics": "psnr"}, "metrics must be a list"),
    ({"metrics_random_init": "yes"}, "metrics_random_init must be true or false"),
    ({"interval1_check": {"tolerance": 0}}, "interval1_check.tolerance must be a number > 0 (got 0)"),
    ({"interval1_check": {"tolerance": "small"}}, "interval1_check.tolerance must be a number > 0"),
    ({"interval1_check": {"flags": {"interval": -2, "cache_mode": "hicache"}}}, "--interval must be >= 1"),
    ({"fid_reference_dir": "/no/such/folder", "metrics": ["fid"]}, "fid_reference_dir: no such folder"),
    ({"fid_reference_dir": str(ROOT / "configs"), "metrics": ["psnr"]}, "needs the 'fid' metric"),
    ({"fid_reference_dir": str(ROOT / "configs"), "metrics": ["fid"]}, "fid_reference_dir: no images"),
])
def test_bad_config_names_the_bad_key(tmp_path, changes, message):
    with pytest.raises(sweep.ConfigError) as err:
        sweep.load_config(write_config(tmp_path, **changes))
    assert message in str(err.value)


def test_variant_invalid_on_this_machine_is_kept_with_its_error(tmp_path):
    path = write_config(tmp_path, variants=[{"name": "none"},
                                            {"name": "aoti", "flags": {"compile_export_mode": "export_aoti"}}])
    config = sweep.load_config(path)
    assert "export_aoti needs CUDA" in config.variant("aoti").stack_error  # recorded as failed at run time


def test_shards_split_prompt_seed_pairs_disjointly_and_completely(tmp_path):
    config = sweep.load_config(write_config(tmp_path))
    full = sweep.work_list(config, num_prompts=3)
    assert len(full) == 2 * 3 * 2
    shards = [sweep.work_list(config, 3, (i, 3)) for i in range(3)]
    keys = [it.key for shard in shards for it in shard]
    assert sorted(keys) == sorted(it.key for it in full) and len(set(keys)) == len(keys)
    for shard in shards:  # every variant of a shard has the same (prompt, seed) pairs: baselines stay local
        pairs = {v.name: [(it.prompt_index, it.seed) for it in shard if it.variant == v.name] for v in config.variants}
        assert pairs["none"] == pairs["taylor"] and len(pairs["none"]) == 2
    assert sweep.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1-2"):
        with pytest.raises(ValueError):
            sweep.parse_shard(bad)


def test_torn_last_line_is_skipped_and_cut_before_appending(tmp_path):
    path = tmp_path / "records" / "shard-0-of-1.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"key": "a"}) + "\n" + json.dumps({"key": "b"}) + "\n" + '{"key": "c", "lat')
    assert [r["key"] for r in sweep.read_jsonl(path)] == ["a", "b"]
    writer = sweep.RecordWriter(tmp_path, (0, 1))
    writer.append({"key": "d"})
    writer.close()
    assert [r["key"] for r in sweep.read_jsonl(path)] == ["a", "b", "d"]
    assert path.read_text().count("\n") == 3


def test_merge_reports_ok_failed_and_incomplete_variants(tmp_path):
    config = sweep.load_config(write_config(tmp_path, variants=[
        {"name": "none"}, {"name": "taylor", "flags": {"cache_mode": "taylor"}},
        {"name": "hicache", "flags": {"cache_mode": "hicache"}}]))
    prompts = [{"prompt": f"p{i}"} for i in range(3)]
    writer = sweep.RecordWriter(config.output_dir, (0, 1))
    for item in sweep.work_list(config, 3):
        if item.variant == "taylor" and item.prompt_index == 2:
            continue  # taylor failed on its last prompt; hicache has one image
        if item.variant == "hicache" and (item.prompt_index, item.seed) != (0, 0):
            continue
        writer.submit(Image.new("RGB", (8, 8)), {"key": item.key, "status": "ok", "variant": item.variant,
                                                 "image": item.image, "argv": [], "prompt_index": item.prompt_index,
                                                 "prompt": prompts[item.prompt_index]["prompt"]})
    writer.drain()
    writer.append({"key": "taylor/failed", "status": "failed", "variant": "taylor",
                   "error": "OutOfMemoryError: CUDA out of memory"})
    writer.close()
    merged = sweep.merge_records(config, prompts)
    assert merged.status == {"none": "ok", "taylor": "failed: OutOfMemoryError: CUDA out of memory",
                             "hicache": "incomplete (1/6)"}
    assert len(merged.records) == 6 + 4 + 1
    assert len(sweep.read_jsonl(config.output_dir / "records.jsonl")) == 11


def test_flop_counts_come_from_the_caching_layer_when_present():
    class FakeCache:
        def stats(self):
            return {"full_steps": 12, "forecast_steps": 38, "flops_speedup": 4.0}

    class FakeTransformer:
        harness_cache = FakeCache()

    class FakePipeline:
        transformer = FakeTransformer()

    args = type("Args", (), {"num_inference_steps": 50})()
    counts = sweep.cache_counts(FakePipeline(), args, dense_forward_flops=10)
    assert (counts["full_steps"], counts["forecast_steps"], counts["flops_dense"], counts["flops"]) == (12, 38, 500, 125)
    FakeTransformer.harness_cache = None
    counts = sweep.cache_counts(FakePipeline(), args, dense_forward_flops=10)
    assert (counts["full_steps"], counts["forecast_steps"], counts["flops"], counts["flops_speedup"]) == (50, 0, 500, 1.0)


def test_resume_refuses_a_variant_whose_flags_changed(tmp_path):
    config = sweep.load_config(write_config(tmp_path))
    old = {"key": "taylor/p0000_s0", "status": "ok", "variant": "taylor", "argv": ["--ckpt", "tiny", "--cache_mode", "fora"]}
    with pytest.raises(sweep.ConfigError, match="variant 'taylor' was generated .* with flags '--ckpt tiny --cache_mode fora'"):
        sweep.check_flags_unchanged(config, [old])
    sweep.check_flags_unchanged(config, [{**old, "argv": config.variant("taylor").argv}])  # same flags: resumes


def test_a_key_given_twice_is_refused_not_resolved_to_the_last(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "output_dir": str(tmp_path / "out")}) + "baseline: taylor\n")
    with pytest.raises(sweep.ConfigError, match=r"key 'baseline' appears twice \(first on line \d+\)"):
        sweep.load_config(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"output_dir: {tmp_path}/out\nbaseline: none\nvariants:\n  - name: none\n"
                      f"    flags: {{interval: 3, interval: 4}}\n")
    with pytest.raises(sweep.ConfigError, match="key 'interval' appears twice"):
        sweep.load_config(nested)


def test_unreadable_config_and_prompt_files_are_one_line_errors(tmp_path):
    with pytest.raises(sweep.ConfigError, match=r"^--config .*missing.yaml: no such file$"):
        sweep.load_config(tmp_path / "missing.yaml")
    with pytest.raises(sweep.ConfigError, match="a folder, not a YAML file"):
        sweep.load_config(tmp_path)
    (tmp_path / "bad.yaml").write_text("variants: [\n")
    with pytest.raises(sweep.ConfigError, match="not valid YAML") as err:
        sweep.load_config(tmp_path / "bad.yaml")
    assert "\n" not in str(err.value)
    for spec, message in ((str(tmp_path / "missing.txt"), "prompt file not found"),
                          (f"text:{tmp_path}", "is a folder")):
        config = sweep.load_config(write_config(tmp_path, prompts={"spec": spec}))
        with pytest.raises(sweep.ConfigError, match=message):
            sweep.load_sweep_prompts(config)
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.yaml"
        locked.write_text("a: 1\n")
        locked.chmod(0)
        with pytest.raises(sweep.ConfigError, match="not readable"):
            sweep.load_config(locked)


def test_machine_checks_are_separate_from_the_config_checks(tmp_path):
    path = write_config(tmp_path, variants=[{"name": "none"},
                                            {"name": "aoti", "flags": {"compile_export_mode": "export_aoti"}}])
    config = sweep.load_config(path, check_machine=False)
    assert config.variant("aoti").stack_error is None
    sweep.check_on_this_machine(config)
    assert "export_aoti needs CUDA" in config.variant("aoti").stack_error


def test_resume_counts_a_record_only_for_its_own_prompt(tmp_path):
    (tmp_path / "none").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "none/p0001_s0.png")
    rec = {"key": "none/p0001_s0", "status": "ok", "variant": "none", "prompt_index": 1, "prompt": "a red cat",
           "seed": 0, "image": "none/p0001_s0.png"}
    same = [{"prompt": "x"}, {"prompt": "a red cat"}]
    other = [{"prompt": "x"}, {"prompt": "a blue dog"}]
    assert list(sweep.latest_ok_records([rec], tmp_path, same)) == ["none/p0001_s0"]
    assert sweep.latest_ok_records([rec], tmp_path, other) == {}
    assert sweep.latest_ok_records([rec], tmp_path, same[:1]) == {}  # index out of the current set
    (tmp_path / "none/p0001_s0.png").unlink()
    assert sweep.latest_ok_records([rec], tmp_path, same) == {}  # no image, no record


def test_output_dir_that_cannot_be_written_or_is_full_is_refused(tmp_path, monkeypatch):
    assert sweep.check_output_dir(tmp_path / "new" / "out") is None and (tmp_path / "new/out").is_dir()
    assert not list((tmp_path / "new/out").iterdir())  # the write check leaves nothing behind
    warning = sweep.check_output_dir(tmp_path, bytes_to_write=2**60)
    assert "the images still to generate take up to" in warning

    real_mkstemp = sweep.tempfile.mkstemp

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(sweep.tempfile, "mkstemp", read_only)
    with pytest.raises(sweep.OutputDirError, match="cannot write there .*Read-only file system"):
        sweep.check_output_dir(tmp_path)
    monkeypatch.setattr(sweep.tempfile, "mkstemp", real_mkstemp)

    usage = sweep.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(sweep.shutil, "disk_usage", lambda path: usage._replace(free=3 * 2**20))
    with pytest.raises(sweep.OutputDirError, match=r"its filesystem is full \(3.0 MiB free\)"):
        sweep.check_output_dir(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_output_dir_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(sweep.OutputDirError, match="cannot write there"):
            sweep.check_output_dir(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_a_shard_lock_is_held_against_other_processes_and_released_when_the_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from utils import sweep; lock = sweep.hold_lock(sys.argv[2], 'shard-0-of-1'); "
                               "print('held', flush=True); time.sleep(60)", str(ROOT), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(sweep.OutputDirError, match=rf"shard-0-of-1 is being run by pid {holder.pid} on "):
            sweep.hold_lock(tmp_path, "shard-0-of-1")
        sweep.hold_lock(tmp_path, "shard-1-of-2").close()  # another shard runs beside it
    finally:
        holder.kill()
        holder.wait()
    sweep.hold_lock(tmp_path, "shard-0-of-1").close()  # SIGKILL released it


def test_stack_report_in_one_line():
    stack = {"qkv_fusion": "applied", "attention": "unavailable (no CUDA device): falling back to SDPA (cuDNN on GPU)",
             "chipmunk": "skipped (no --chipmunk_config)",
             "feature_cache": "applied: fora (interval 3, first_enhance 2)",
             "float8_quant": "unavailable (float8 matmuls need an sm_89+ GPU)",
             "inductor_flags": "skipped (eager run: the flags and the GELU form only change compiled code)",
             "compile_export": "skipped (--compile_export_mode disabled (default on CPU)): eager"}
    assert sweep.stack_line(stack) == (
        "applied qkv_fusion, feature_cache fora (interval 3, first_enhance 2); unavailable attention (no CUDA "
        "device), float8_quant (float8 matmuls need an sm_89+ GPU); skipped chipmunk, inductor_flags, compile_export")
    compiled = {**stack, "compile_export": "applied: torch.compile (regional, mode=default)",
                "inductor_flags": "applied: conv_1x1_as_mm=True; tanh-GELU as x*sigmoid(2u) in 8 MLPs"}
    assert "inductor_flags, " in sweep.stack_line(compiled)
    assert "compile_export torch.compile (regional, mode=default)" in sweep.stack_line(compiled)


def test_write_failures_are_the_folders_and_drain_raises_them(tmp_path, monkeypatch):
    writer = sweep.RecordWriter(tmp_path, (0, 1))
    real_open = Path.open

    def full_disk(self, mode="r", *args, **kwargs):
        if self.suffix == ".tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(self, mode, *args, **kwargs)
    monkeypatch.setattr(Path, "open", full_disk)
    with pytest.raises(sweep.OutputWriteError, match="No space left on device"):
        writer.submit(Image.new("RGB", (8, 8)), {"key": "a/p0000_s0", "image": "a/p0000_s0.png"})
        writer.drain()  # unless submit() found it finished already
    writer.drain()  # raised once
    writer.close()
    assert sweep.read_jsonl(sweep.records_path(tmp_path, (0, 1))) == []  # no record without its image


def test_metrics_are_kept_per_variant_and_recomputed_only_when_their_inputs_change(tmp_path, monkeypatch):
    from utils import metrics

    config = sweep.load_config(write_config(tmp_path, metrics=["psnr", "ssim"], prompts={"spec": "default", "limit": 2},
                                            seeds_per_prompt=1))
    prompts = sweep.load_sweep_prompts(config)
    writer = sweep.RecordWriter(config.output_dir, (0, 1))
    for item in sweep.work_list(config, 2):
        color = (10 * item.prompt_index, 50 if item.variant == "none" else 60, 90)
        writer.submit(Image.new("RGB", (16, 16), color),
                      {"key": item.key, "status": "ok", "variant": item.variant, "prompt_index": item.prompt_index,
                       "prompt": prompts[item.prompt_index]["prompt"], "seed": item.seed, "image": item.image,
                       "argv": config.variant(item.variant).argv, "written_utc": "t0"})
    writer.drain()
    writer.close()
    calls = []
    real = metrics.compute_metrics
    monkeypatch.setattr(metrics, "compute_metrics", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    merged = sweep.merge_records(config, prompts)
    first = sweep.compute_sweep_metrics(config, merged, "cpu")
    assert calls == [2, 2] and set(first[1]) == {"none", "taylor"}
    assert sweep.compute_sweep_metrics(config, merged, "cpu") == first and calls == [2, 2]  # nothing redone
    # a regenerated taylor image changes taylor's inputs only
    Image.new("RGB", (16, 16), (200, 0, 0)).save(config.output_dir / "taylor/p0001_s0.png")
    again = sweep.compute_sweep_metrics(config, merged, "cpu")
    assert calls == [2, 2, 2] and again[1]["none"] == first[1]["none"]
    assert again[1]["taylor"]["psnr_mean"] < first[1]["taylor"]["psnr_mean"]

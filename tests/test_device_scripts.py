"""The H100 proof scripts run end to end on CPU with the tiny pipeline (a dry run), so that a broken script is found
here and not after minutes of device time."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stage_table_dry_run_writes_every_stage(tmp_path):
    stages = ["eager", "compile", "qkv_fusion", "sigmoid_gelu", "inductor_flags", "cudagraphs", "export_aoti"]
    subprocess.run([sys.executable, "scripts/h100_stages.py", "--ckpt", "tiny", "--device", "cpu", "--height", "64",
                    "--width", "64", "--num_inference_steps", "2", "--stages", ",".join(stages), "--step_runs", "2",
                    "--e2e_runs", "1", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "aoti")], cwd=ROOT, check=True, capture_output=True, text=True)
    record = json.loads(next(tmp_path.glob("stages_tiny_64x64_2steps.json")).read_text())
    assert [row["stage"] for row in record["rows"]] == stages
    assert all(row["step_ms"] > 0 and row["e2e_s"] > 0 for row in record["rows"])
    assert record["rows"][-2]["note"].startswith("torch.compile mode reduce-overhead")
    assert record["rows"][-1]["note"].startswith("AOTI packages regional: 2 double blocks (built")
    assert record["rows"][3]["note"] == "tanh-GELU as x*sigmoid(2u) in 8 MLPs"  # tiny: 2 double (2 MLPs each) + 4 single
    table = (tmp_path / "stages_tiny_64x64_2steps.md").read_text()
    assert "| cudagraphs |" in table and record["command"] in table


def test_chipmunk_trace_part_dry_run_tables_host_and_device_time_per_step(tmp_path):
    subprocess.run([sys.executable, "scripts/h100_chipmunk.py", "--dry-run", "--out", str(tmp_path), "--parts", "trace"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    record = json.loads((tmp_path / "chipmunk_dryrun.json").read_text())
    rows = {row["variant"]: row for row in record["trace"]["rows"]}
    assert set(rows) == {"dense stack", "chipmunk"}
    for row in rows.values():
        assert len(row["steps"]) == 4 and all(step["host_ms"] > 0 for step in row["steps"])
        assert Path(row["trace"]).exists()
    assert "| chipmunk | 3 |" in (tmp_path / "chipmunk_dryrun.md").read_text()


def test_inductor_cache_goes_out_in_parts_under_the_file_limit_and_comes_back_whole(tmp_path):
    """The device returns files of at most 16 MiB: h100_env.sh saves the cache in 15 MiB parts and restores from
    them. Incompressible data, so the archive really splits."""
    import os

    cache, out, work = tmp_path / "cache", tmp_path / "out", tmp_path / "work"
    for d in (cache / "triton", out, work / ".inductor_cache"):
        d.mkdir(parents=True)
    payload = os.urandom(20 * 2**20)
    (cache / "triton" / "kernel.bin").write_bytes(payload)
    def source_env(cache_dir, then=""):
        return subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/h100_env.sh" {then}'], cwd=work, check=True,
                              env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir)), capture_output=True,
                              text=True)

    source_env(cache, f'&& save_inductor_cache "{out}"')
    parts = sorted(out.glob("inductor_cache.tgz.*"))
    assert len(parts) == 2 and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    for p in parts:
        (work / ".inductor_cache" / p.name).write_bytes(p.read_bytes())
    restored = tmp_path / "restored"  # a fresh machine's empty cache folder
    assert "inductor cache restored" in source_env(restored).stdout
    assert (restored / "triton" / "kernel.bin").read_bytes() == payload

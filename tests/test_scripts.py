"""The GPU benchmark scripts (scripts/bench_*.py, gpu_env.sh) run end to end on CPU with the tiny pipeline (a dry run),
so that a broken script is found here and not after minutes on a GPU node."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_stage_table_dry_run_writes_every_stage(tmp_path):
    stages = ["eager", "compile", "qkv_fusion", "sigmoid_gelu", "persistent_reductions", "inductor_flags",
              "cudagraphs", "export_aoti"]
    command = [sys.executable, "scripts/bench_stages.py", "--ckpt", "tiny", "--device", "cpu", "--height", "64",
               "--width", "64", "--num_inference_steps", "2", "--stages", ",".join(stages), "--step_runs", "2",
               "--e2e_runs", "1", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "aoti")]
    # A second process that builds the single-block package (on the device it runs beside the timed one): it times
    # nothing and writes no record, and the timed run below loads its package instead of building one.
    builder = subprocess.run(command + ["--aoti_build_only", "single"], cwd=ROOT, check=True, capture_output=True,
                             text=True)
    assert "4 single blocks (built flux_single_block_" in builder.stdout and "(build only" in builder.stdout
    assert not list(tmp_path.glob("stages_*")) and [p.name.split("_")[1] for p in (tmp_path / "aoti").glob("*.pt2")] \
        == ["single"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    record = json.loads(next(tmp_path.glob("stages_tiny_64x64_2steps.json")).read_text())
    assert [row["stage"] for row in record["rows"]] == stages
    assert all(row["step_ms"] > 0 and row["e2e_s"] > 0 for row in record["rows"])
    assert record["rows"][-2]["note"] == "CPU dry run: no CUDA graphs"
    assert record["rows"][-1]["note"].startswith("AOTI packages regional: 2 double blocks (built")
    assert "4 single blocks (cached flux_single_block_" in record["rows"][-1]["note"]
    # The packages compute what the layers do, within bf16 rounding (inductor's fused kernels round in other places
    # than eager; 5.5e-3 here).
    assert 0 < record["rows"][-1]["rel_err_vs_same_stack_eager"] < 2e-2
    assert record["rows"][3]["note"] == "tanh-GELU as x*sigmoid(2u) in 8 MLPs"  # tiny: 2 double (2 each) + 4 single
    assert record["rows"][4]["note"].startswith("inductor multi_kernel=1")
    table = (tmp_path / "stages_tiny_64x64_2steps.md").read_text()
    assert "| cudagraphs |" in table and record["command"] in table


def test_chipmunk_trace_part_dry_run_tables_host_and_device_time_per_step(tmp_path):
    subprocess.run([sys.executable, "scripts/bench_chipmunk.py", "--dry-run", "--out", str(tmp_path), "--parts", "trace"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    record = json.loads((tmp_path / "chipmunk_dryrun.json").read_text())
    rows = {row["variant"]: row for row in record["trace"]["rows"]}
    assert set(rows) == {"dense stack", "chipmunk"}
    for row in rows.values():
        assert len(row["steps"]) == 4 and all(step["host_ms"] > 0 for step in row["steps"])
        assert Path(row["trace"]).exists()
    assert "| chipmunk | 3 |" in (tmp_path / "chipmunk_dryrun.md").read_text()


def _source_env(work: Path, then: str = "", **env: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/gpu_env.sh" {then}'], cwd=work, check=True,
                          env=dict(os.environ, **{k: str(v) for k, v in env.items()}), capture_output=True, text=True)


def test_inductor_cache_goes_out_in_parts_under_the_file_limit_and_comes_back_whole(tmp_path):
    """The device returns files of at most 16 MiB: gpu_env.sh saves the cache in 15 MiB parts and restores from
    them. Incompressible data, so the archive really splits. Triton's binaries stay behind unless asked for."""
    import os

    cache, out, work = tmp_path / "cache", tmp_path / "out", tmp_path / "work"
    for d in (cache / "fxgraph", cache / "triton", out, work / ".inductor_cache"):
        d.mkdir(parents=True)
    payload = os.urandom(20 * 2**20)
    (cache / "fxgraph" / "graph.bin").write_bytes(payload)
    (cache / "triton" / "kernel.cubin").write_bytes(b"binary")
    aoti = tmp_path / "aoti"
    _source_env(work, f'&& save_inductor_cache "{out}"', TORCHINDUCTOR_CACHE_DIR=cache, FLUX_AOTI_DIR=aoti)
    parts = sorted(out.glob("inductor_cache.tgz.*"))
    assert len(parts) == 2 and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    for p in parts:
        (work / ".inductor_cache" / p.name).write_bytes(p.read_bytes())
    restored = tmp_path / "restored"  # a fresh machine's empty cache folder
    assert "inductor cache restored" in _source_env(work, TORCHINDUCTOR_CACHE_DIR=restored, FLUX_AOTI_DIR=aoti).stdout
    assert (restored / "fxgraph" / "graph.bin").read_bytes() == payload
    assert not (restored / "triton").exists()  # recompiled from source on the device; too large to carry

    full = tmp_path / "full"
    full.mkdir()
    _source_env(work, f'&& save_inductor_cache "{full}" full', TORCHINDUCTOR_CACHE_DIR=cache, FLUX_AOTI_DIR=aoti)
    listing = subprocess.run(f'cat "{full}"/inductor_cache.tgz.* | tar tz', shell=True, check=True,
                             capture_output=True, text=True).stdout
    assert "./triton/kernel.cubin" in listing


def test_aoti_packages_go_out_and_are_restored_for_the_next_command(tmp_path):
    aoti, out, work = tmp_path / "aoti", tmp_path / "out", tmp_path / "work"
    for d in (aoti, out, work / ".aoti_cache"):
        d.mkdir(parents=True)
    (aoti / "flux_double_block_abc.pt2").write_bytes(b"package")
    (aoti / "flux_double_block_abc.json").write_text("{}")
    _source_env(work, f'&& save_aoti_cache "{out}"', TORCHINDUCTOR_CACHE_DIR=tmp_path / "ic", FLUX_AOTI_DIR=aoti)
    for p in out.glob("aoti_cache.tgz.*"):
        (work / ".aoti_cache" / p.name).write_bytes(p.read_bytes())
    fresh = tmp_path / "fresh"
    printed = _source_env(work, TORCHINDUCTOR_CACHE_DIR=tmp_path / "ic", FLUX_AOTI_DIR=fresh).stdout
    assert "AOTI packages restored" in printed
    assert (fresh / "flux_double_block_abc.pt2").read_bytes() == b"package"


def test_stage_table_lists_each_timed_stage_largest_kernels(tmp_path):
    """On a GPU each timed row carries its largest kernels (device ms and launches per step); the markdown lists
    them under the table (the CPU dry run has no device time, so the rows are made here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_stages", ROOT / "scripts" / "bench_stages.py")
    stages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stages)
    kernels = [{"kernel": "triton_red_fused_abs_amax_cat_gelu_view_3", "kind": "fused (inductor)", "ms": 4.7,
                "calls": 38.0},
               {"kernel": "nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_ovscale_bias_TNT", "kind": "matmul", "ms": 39.77,
                "calls": 209.0}]
    record = {"ckpt": "random:flux-dev", "random_weights": True,
              "environment": {"gpu": "GPU", "torch": "t", "diffusers": "d", "torchao": "a", "fa3": "f"},
              "shapes": {"height": 64, "width": 64, "steps": 2, "image_tokens": 16, "max_sequence_length": 32},
              "compile_scope": "regional", "compile_mode": "default", "quant_granularity": "row", "step_runs": 2,
              "e2e_runs": 1, "command": "python scripts/bench_stages.py", "applied_untimed": [],
              "rows": [{"stage": "float8_quant", "step_ms": 94.2, "step_vs_eager": 0.55, "e2e_s": 2.86,
                        "e2e_speedup": 1.74,
                        "apply_and_compile_s": 199, "step_device_ms_by_kind": {"matmul": 39.77}, "note": "",
                        "top_kernels": kernels}]}
    record["failed"] = {"export_aoti": "export_aoti: loading the AOTInductor package p.pt2 crashed (signal 11)"}
    stages.write_markdown(record, tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert "Largest kernels of one `float8_quant` step" in text
    assert "| export_aoti | failed | | | | | | export_aoti: loading the AOTInductor package p.pt2 crashed" in text
    assert "| 4.70 | 38 | fused (inductor) | `triton_red_fused_abs_amax_cat_gelu_view_3` |" in text


def test_chipmunk_e2e_float8_pair_drops_only_disable_quant(tmp_path, monkeypatch):
    """--e2e_float8 adds the dense stack and Chipmunk with float8 linears (and with its MLP in float8 too); the bf16
    variants keep --disable_quant.
    Each variant is compared with the dense stack of its own precision. (Commands captured, not run.)"""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_chipmunk

    commands = []

    def fake_child(cmd, timeout):
        commands.append(cmd)
        results = Path(cmd[cmd.index("--results_dir") + 1])
        results.mkdir(parents=True, exist_ok=True)
        seconds = 2.0 if "--chipmunk_config" in cmd else 3.0  # Chipmunk 1.5x faster in this fake
        (results / f"bench_{len(commands)}.json").write_text(json.dumps(
            {"latency_s": {"median": seconds}, "stages_s": {"denoising_total": {"median": seconds}}, "stack": {}}))
        return 0, ""

    monkeypatch.setattr(bench_chipmunk, "run_child", fake_child)
    part = bench_chipmunk.part_e2e(tmp_path, dry=False, steps=4, runs=1, deadline=float("inf"), float8=True)
    by_name = {row["variant"]: row for row in part["rows"]}
    float8_names = {"dense stack + float8 (CUDA graphs)",
                    "chipmunk + float8 (dense projections) (CUDA graphs per step kind)",
                    "chipmunk + float8, its MLP too (CUDA graphs per step kind)"}
    assert float8_names < set(by_name) and len(commands) == len(by_name) == 7
    assert "configs/chipmunk-flux-fp8.yml" in commands[-1]
    for cmd in commands:
        name = next(n for n in by_name if by_name[n]["record"] == f"bench_{commands.index(cmd) + 1}.json")
        assert ("--disable_quant" in cmd) == (name not in float8_names), (name, cmd)
        graphed = "(CUDA graphs" in name  # every variant that can hold graphs, and says so
        assert ("--compile_mode" in cmd) == graphed and graphed == ("hicache" not in name and "no CUDA" not in name)
    assert by_name["chipmunk + float8 (dense projections) (CUDA graphs per step kind)"]["speedup_vs_dense"] == 1.5
    assert by_name["dense stack + float8 (CUDA graphs)"]["speedup_vs_dense"] == 1.0


def test_chipmunk_e2e_variants_chosen_run_in_the_fixed_order(tmp_path, monkeypatch):
    """--e2e_variants picks which variants run, in the fixed order; an unknown name is refused before anything
    runs."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_chipmunk

    calls = []

    def fake_child(cmd, timeout):
        calls.append(cmd)
        results = Path(cmd[cmd.index("--results_dir") + 1])
        results.mkdir(parents=True, exist_ok=True)
        (results / f"bench_{len(calls)}.json").write_text(json.dumps(
            {"latency_s": {"median": 3.0}, "stages_s": {"denoising_total": {"median": 3.0}}, "stack": {}}))
        return 0, ""

    monkeypatch.setattr(bench_chipmunk, "run_child", fake_child)
    rows = bench_chipmunk.part_e2e(tmp_path, dry=False, steps=4, runs=1, deadline=float("inf"),
                                   wanted="eager,chipmunk,dense")["rows"]
    assert [r["variant"] for r in rows] == ["dense stack (CUDA graphs)", "chipmunk (CUDA graphs per step kind)",
                                            "chipmunk, no CUDA graphs"]
    assert "--chipmunk_config" not in calls[0] and "--compile_mode" not in calls[2]
    with pytest.raises(ValueError, match="unknown e2e variant.*'sidestream'.*hicache"):
        bench_chipmunk.part_e2e(tmp_path, dry=False, steps=4, runs=1, deadline=float("inf"), wanted="dense,sidestream")
    assert len(calls) == 3


def test_chipmunk_e2e_variant_cut_by_the_budget_is_not_called_a_failure(tmp_path, monkeypatch):
    """A child killed at the budget (run_child's 124) is recorded as cut by the budget, and a real non-zero exit as a
    failure, not "FAILED (exit 124)"."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_chipmunk

    outcomes = iter([(0, None), (124, "timed out after 5 s"), (1, "Traceback ...")])

    def fake_child(cmd, timeout):
        rc, tail = next(outcomes, (0, None))
        if rc == 0:
            results = Path(cmd[cmd.index("--results_dir") + 1])
            results.mkdir(parents=True, exist_ok=True)
            (results / f"bench_{len(list(results.glob('bench_*.json')))}.json").write_text(json.dumps(
                {"latency_s": {"median": 3.0}, "stages_s": {"denoising_total": {"median": 3.0}}, "stack": {}}))
        return rc, tail or ""

    monkeypatch.setattr(bench_chipmunk, "run_child", fake_child)
    rows = bench_chipmunk.part_e2e(tmp_path, dry=False, steps=4, runs=1, deadline=float("inf"))["rows"]
    assert rows[0]["median_s"] == 3.0
    assert rows[1]["skipped"].startswith("budget: cut after") and "exit_code" not in rows[1]
    assert rows[2]["exit_code"] == 1 and "skipped" not in rows[2]
    assert rows[-1]["variant"] == "chipmunk, no CUDA graphs"  # last: the least informative to lose to the budget
    assert "FAILED (exit 1)" in bench_chipmunk.markdown({"environment": {}, "command": "x", "dry_run": False,
                                                        "part_seconds": {},
                                                        "e2e": {"steps": 4, "runs": 1, "rows": rows}})


def test_chipmunk_speed_record_names_the_autotuners_picks(monkeypatch):
    """The speed part lists each autotuned kernel's chosen config per tuning key, so a record says which tile ran."""
    triton = pytest.importorskip("triton", reason="Triton comes with the CUDA build of torch that requirements.txt "
                                                  "installs; only a CPU-only torch lacks it")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_chipmunk
    from utils.chipmunk import kernels as T

    key = (4608, 3712, 3072, 128)
    monkeypatch.setitem(T._sparse_fc1_kernel.cache, key,
                        triton.Config({"BLOCK_K": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3))
    picks = bench_chipmunk.autotune_picks()
    assert picks["_sparse_fc1_kernel"]["4608, 3712, 3072, 128"] == "BLOCK_K=256, BLOCK_D=64, warps 8, stages 3"


def test_env_script_builds_aoti_with_the_system_gpp_where_the_device_sets_opt_gcc(tmp_path):
    """On a GPU image whose CXX=/opt/gcc/bin/g++, that compiler built AOTI .so files that crashed their loader and
    /usr/bin/g++ built ones that load (docs/DESIGN.md): gpu_env.sh swaps that one value, and keeps any other."""
    import shutil

    if not Path("/usr/bin/g++").exists():
        pytest.skip("no /usr/bin/g++ here: gpu_env.sh leaves CXX alone then")
    env = dict(TORCHINDUCTOR_CACHE_DIR=tmp_path / "cache", FLUX_AOTI_DIR=tmp_path / "aoti")
    swapped = _source_env(tmp_path, '&& echo "CXX=$CXX"', CXX="/opt/gcc/bin/g++", **env).stdout
    assert "CXX=/usr/bin/g++" in swapped.splitlines()
    other = shutil.which("g++") or "/some/other/g++"
    kept = _source_env(tmp_path, '&& echo "CXX=$CXX"', CXX=other, **env).stdout
    assert f"CXX={other}" in kept.splitlines()


def test_chipmunk_graphs_table_says_how_many_graphs_each_run_compiled(monkeypatch):
    """A recompile between runs changes kernels and rounding: the graphs table shows it per run (records made before
    the column existed render it empty). Rendered from a recorded H200 run (tests/fixtures)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_chipmunk

    record = json.loads((ROOT / "tests/fixtures/chipmunk_device_record.json").read_text())
    rows = record["graphs"]["rows"]
    rows[-1]["graphs_compiled"] = 2
    text = bench_chipmunk.markdown(record)
    assert "| graphs 3 | 1.28 | 0.00e+00 | True | True | 2 |" in text
    assert "| eager 2 | 1.37 | 0.00e+00 | True | True |  |" in text


def test_cache_digests_find_the_first_cache_a_run_departs_at(monkeypatch):
    """The graphs part checksums every layer's caches after each step; the first (step, cache) whose checksums differ
    from eager 1's names where a graphed run departs, in the layers' order. One element changed by one bf16 ulp is
    found; equal caches give nothing."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_chipmunk

    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(3)

    def layers(tensors):
        names = ("act_cache", "neuron_index", "pre_mean")
        return [SimpleNamespace(name=f"MLP layer {i}", CACHES=names, **{n: t.get(n) for n in names})
                for i, t in enumerate(tensors)]

    caches = [{"act_cache": torch.randn(2, 64, 32, generator=gen).bfloat16(),
               "neuron_index": torch.randint(0, 32, (2, 1, 8), generator=gen, dtype=torch.int32)} for _ in range(3)]
    reference = [bench_chipmunk.cache_digests(layers(caches)) for _ in range(2)]
    assert len(reference[0]) == 6 and all(len(v) == 2 for v in reference[0].values())
    assert bench_chipmunk.first_departures(reference, reference) == []
    changed = [{k: v.clone() for k, v in c.items()} for c in caches]
    value = changed[1]["act_cache"][1, 5, 7]
    changed[1]["act_cache"][1, 5, 7] = torch.nextafter(value, torch.tensor(1e9, dtype=torch.bfloat16))
    assert not torch.equal(changed[1]["act_cache"], caches[1]["act_cache"])
    changed[2]["pre_mean"] = torch.randn(2, 1, 32, generator=gen)  # a cache the reference did not have yet
    run = [reference[0], bench_chipmunk.cache_digests(layers(changed))]
    found = bench_chipmunk.first_departures(run, reference)
    assert [(d["step"], d["cache"]) for d in found] == [(1, "MLP layer 1/act_cache")]
    assert found[0]["expected"] == reference[1]["MLP layer 1/act_cache"]

    record = json.loads((ROOT / "tests/fixtures/chipmunk_device_record.json").read_text())
    record["graphs"]["rows"][-1]["first_cache_departures"] = found
    text = bench_chipmunk.markdown(record)
    assert "| graphs 3 | 1 | MLP layer 1/act_cache |" in text


def test_caching_benchmark_dry_run_times_each_mode_with_the_products_stage_timer(tmp_path):
    """bench_caching.py on the tiny pipeline: one compiled-once pipeline, the mode switched per variant, each step
    timed by run_benchmark.py's stage timer and sorted by the cache's own step kinds."""
    subprocess.run([sys.executable, "scripts/bench_caching.py", "--out", str(tmp_path), "--ckpt", "tiny", "--steps", "5",
                    "--modes", "fora", "taylor", "--intervals", "2", "--runs", "1", "--no_profile", "--first_enhance",
                    "2"], cwd=ROOT, check=True, capture_output=True, text=True)
    record = json.loads((tmp_path / "caching.json").read_text())
    rows = {row["variant"].split(" (")[0] + (" repeat" if "repeat" in row["variant"] else ""): row
            for row in record["variants"]}
    assert set(rows) == {"none", "fora", "taylor", "none repeat"}
    for name in ("fora", "taylor"):
        assert rows[name]["step_kinds"] == "FFcFc" and rows[name]["forecast_step_ms_median"] > 0
        assert rows[name]["denoise_s_median"] > 0 and rows[name]["full_step_ms_median"] > 0
    assert rows["none"]["step_kinds"] == "FFFFF" and rows["none"]["forecast_step_ms_median"] is None

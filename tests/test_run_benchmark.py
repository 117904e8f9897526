"""run_benchmark.py and gen_image.py end to end on the tiny pipeline (CPU)."""

import gzip
import json
from pathlib import Path

import pytest
from PIL import Image

import gen_image
import run_benchmark


def test_benchmark_record_has_its_fields(tmp_path):
    trace = tmp_path / "trace.json.gz"
    record = run_benchmark.main(["--ckpt", "tiny", "--device", "cpu", "--disable_bf16", "--num_runs", "2",
                                 "--warmup_runs", "1", "--num_inference_steps", "3", "--results_dir", str(tmp_path),
                                 "--trace-file", str(trace)])
    [path] = tmp_path.glob("bench_tiny_*.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(record, default=str))
    env = record["environment"]
    for key in ("torch", "diffusers", "transformers", "torchao", "triton", "gpu", "device", "timestamp_utc", "python",
                "cxx"):
        assert key in env
    assert env["triton"]  # requirements.txt's torch brings Triton; the Chipmunk kernels compile with it
    assert env["device"] == "cpu" and env["diffusers"]
    assert env["cpu"] and env["cpu_count"] >= 1  # host-bound step times depend on the host
    if "model name" in Path("/proc/cpuinfo").read_text():
        assert env["cpu"] not in ("x86_64", "aarch64")  # the model, not only the architecture
    assert record["random_weights"] is True and record["command"].startswith("run_benchmark.py --ckpt tiny")
    assert record["shapes"] == {"height": 64, "width": 64, "steps": 3, "max_sequence_length": 32, "batch": 1,
                                "guidance_scale": 3.5}
    assert record["stack_flags"]["disable_fa3"] is False and record["stack"]["qkv_fusion"] == "applied"
    latency = record["latency_s"]
    assert latency["n"] == 2 and 0 < latency["min"] <= latency["median"] <= latency["max"]
    stages = record["stages_s"]
    assert {"prompt_encoding", "denoising_step", "denoising_total", "decoding", "postprocessing"} <= set(stages)
    assert stages["denoising_step"]["n"] == 2 * 3  # every step of every timed run
    assert stages["denoising_total"]["median"] < latency["median"]
    assert record["transformer_flops_per_forward"] > 1e6
    table = (tmp_path / "benchmarks.md").read_text().splitlines()
    assert table[0].startswith("| ckpt |") and "tiny (random weights)" in table[2] and path.name in table[2]
    events = json.loads(gzip.open(trace).read())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"prompt_encoding", "denoising_step", "decoding"} <= names


def test_benchmark_refuses_bad_run_counts():
    with pytest.raises(SystemExit):
        run_benchmark.main(["--ckpt", "tiny", "--device", "cpu", "--num_runs", "0"])


def test_gen_image_writes_png_with_its_settings(tmp_path):
    out = tmp_path / "cat.png"
    gen_image.main(["--ckpt", "tiny", "--device", "cpu", "--disable_bf16", "--prompt", "a red cat", "--seed", "3",
                    "--num_inference_steps", "2", "--output-file", str(out), "--disable_fused_projections"])
    image = Image.open(out)
    assert image.size == (64, 64)
    meta = image.text
    assert meta["prompt"] == "a red cat" and meta["seed"] == "3" and meta["num_inference_steps"] == "2"
    assert (meta["height"], meta["width"]) == ("64", "64")
    assert json.loads(meta["stack_flags"])["disable_fused_projections"] is True
    assert json.loads(meta["stack"])["qkv_fusion"].startswith("skipped")


def test_warm_up_runs_until_the_step_graphs_have_captured_every_kind_seen():
    """A step kind is captured at its second occurrence; one that occurs once per generation (step 1's) is only
    captured in the second generation, so the warm-up goes on until none is left uncaptured (at most 2 more)."""
    from types import SimpleNamespace

    class Graphs:  # seen kinds; a generation captures every kind seen before it, and sees one more the first time
        def __init__(self, new_kinds_per_generation):
            self.seen, self.captured, self.new = set(), set(), list(new_kinds_per_generation)

        def uncaptured_kinds(self):
            return len(self.seen - self.captured)

        def generate(self):
            self.captured |= self.seen
            self.seen |= set(self.new.pop(0)) if self.new else set()

    graphs = Graphs([{"A", "B"}])  # Chipmunk's case: kinds first seen in generation 1, captured in generation 2
    pipeline = SimpleNamespace(transformer=SimpleNamespace(step_graphs=graphs))
    assert run_benchmark.warm_up(pipeline, graphs.generate, 1) == 2 and graphs.uncaptured_kinds() == 0
    endless = Graphs([{"A"}, {"B"}, {"C"}, {"D"}, {"E"}])  # a schedule that keeps showing new kinds: bounded
    pipeline.transformer.step_graphs = endless
    assert run_benchmark.warm_up(pipeline, endless.generate, 1) == 3
    no_graphs = SimpleNamespace(transformer=SimpleNamespace())
    runs = []
    assert run_benchmark.warm_up(no_graphs, lambda: runs.append(1), 2) == 2 and len(runs) == 2
    assert run_benchmark.warm_up(pipeline, endless.generate, 0) == 0  # --warmup_runs 0 stays 0

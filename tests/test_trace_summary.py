"""scripts/trace_summary.py on a small synthetic Chrome trace in torch.profiler's event format."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import trace_summary  # noqa: E402


def synthetic_trace() -> list[dict]:
    """Two denoising steps: the first launches two kernels (one through the driver API, as Triton does), the
    second one kernel; a third kernel is launched outside any step."""
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "denoising_step", "ts": 0, "dur": 1000},
        {"ph": "X", "cat": "user_annotation", "name": "denoising_step", "ts": 2000, "dur": 500},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10, "dur": 5, "args": {"correlation": 1}},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": 20, "dur": 5, "args": {"correlation": 2}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 2100, "dur": 5, "args": {"correlation": 3}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 5000, "dur": 5, "args": {"correlation": 4}},
        {"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "ts": 30, "dur": 300, "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "_sparse_fc2_kernel", "ts": 400, "dur": 450, "args": {"correlation": 2}},
        {"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "ts": 2200, "dur": 250, "args": {"correlation": 3}},
        {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_add", "ts": 5100, "dur": 40, "args": {"correlation": 4}},
    ]
    return events


def test_steps_get_the_device_time_of_the_kernels_they_launched(tmp_path):
    rows = trace_summary.step_table(synthetic_trace())
    assert rows == [{"host_ms": 1.0, "device_ms": 0.75, "busy_ms": 0.75, "span_ms": 0.82, "kernels": 2},
                    {"host_ms": 0.5, "device_ms": 0.25, "busy_ms": 0.25, "span_ms": 0.25, "kernels": 1}]


def test_overlapping_kernels_count_once_in_busy_time_and_a_graph_replay_gives_all_its_kernels():
    """A replayed CUDA graph: one launch whose kernels share its correlation id, two of them on a side stream
    overlapping the main stream's."""
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "denoising_step", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 5, "dur": 5, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "attention", "ts": 100, "dur": 300, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "selection", "ts": 150, "dur": 100, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "selection", "ts": 350, "dur": 100, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "fc1", "ts": 500, "dur": 200, "args": {"correlation": 7}},
    ]
    [row] = trace_summary.step_table(events)
    assert row["kernels"] == 1 and abs(row["device_ms"] - 0.7) < 1e-9
    assert abs(row["busy_ms"] - 0.55) < 1e-9 and abs(row["span_ms"] - 0.6) < 1e-9
    tables = trace_summary.step_kernel_tables(events, 2, top=5)
    assert [(r["kernel"], r["calls"]) for r in tables[0]] == [("attention", 1), ("selection", 2), ("fc1", 1)]
    assert tables[1] == []


def test_kernel_table_sums_by_name_with_kinds():
    table = trace_summary.kernel_table(synthetic_trace(), top=2)
    assert [(r["kernel"], r["kind"], r["calls"]) for r in table] == [("nvjet_gemm", "matmul", 2),
                                                                     ("_sparse_fc2_kernel", "other", 1)]
    assert abs(table[0]["total_ms"] - 0.55) < 1e-9 and abs(table[0]["us_per_call"] - 275.0) < 1e-9


def test_command_reads_a_gzipped_trace_and_writes_markdown(tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": synthetic_trace()}, f)
    out = tmp_path / "summary.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "trace_summary.py"), str(path), "--out", str(out)],
                   check=True, capture_output=True, text=True)
    text = out.read_text()
    assert "| 0 | 1.0 | 0.8 | 0.8 | 0.8 | 2 | 0.75 |" in text and "`_sparse_fc2_kernel` | other | 1 | 0.45 | 450.0 |" in text

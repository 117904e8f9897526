"""Summarize a Chrome trace from `run_benchmark.py --trace-file`: is each denoising step CPU- or GPU-bound, and
which kernels take the device time.

For every `denoising_step` range it prints the host time of the step and the device time of the kernels it
launched (matched through the launch's correlation id): a step whose device time is well under its host time
is bound by launch overhead, not by kernels. Then the kernels with the most device time, by name and kind.

    python scripts/trace_summary.py trace.json[.gz] [--top 25] [--out summary.md]
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.benchmark_utils import kernel_kind  # noqa: E402

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def _steps_with_kernels(events: list[dict], label: str) -> list[tuple[dict, int, list[dict]]]:
    """Each `label` range in order, with its number of launches and the device events those launches made
    (matched through the correlation id; a replayed CUDA graph's kernels share its launch's id)."""
    launches = sorted((e["ts"], e["args"]["correlation"]) for e in events
                      if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}))
    device_by_correlation = defaultdict(list)
    for e in events:
        if e.get("cat") in DEVICE_CATEGORIES and "correlation" in e.get("args", {}):
            device_by_correlation[e["args"]["correlation"]].append(e)
    steps = []
    for step in sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"] == label),
                       key=lambda e: e["ts"]):
        start, end = step["ts"], step["ts"] + step["dur"]
        ids = [c for ts, c in launches if start <= ts <= end and c in device_by_correlation]
        steps.append((step, len(ids), [k for c in ids for k in device_by_correlation[c]]))
    return steps


def _busy_us(kernels: list[dict]) -> float:
    """Time with at least one kernel running: the union of their intervals (kernels on two streams overlap)."""
    busy, reach = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k["ts"]):
        start, end = max(k["ts"], reach), k["ts"] + k["dur"]
        busy += max(0.0, end - start)
        reach = max(reach, end)
    return busy


def step_table(events: list[dict], label: str = "denoising_step") -> list[dict]:
    """Per `label` range, in order: host ms, device ms (the sum of its kernels' durations), busy ms (the time at
    least one of them runs: below the sum when streams overlap), span ms (first kernel start to last kernel end:
    the step's wall time on the device, gaps included) and kernel launches."""
    rows = []
    for step, launches, kernels in _steps_with_kernels(events, label):
        span = (max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)) if kernels else 0.0
        rows.append({"host_ms": step["dur"] / 1e3, "device_ms": sum(k["dur"] for k in kernels) / 1e3,
                     "busy_ms": _busy_us(kernels) / 1e3, "span_ms": span / 1e3, "kernels": launches})
    return rows


def step_kernel_tables(events: list[dict], count: int, top: int,
                       label: str = "denoising_step") -> dict[int, list[dict]]:
    """The kernels of the first `count` `label` ranges, summed by name per range (empty past the last range): where
    each step kind's device time goes. One pass over the trace for all of them."""
    steps = _steps_with_kernels(events, label)
    return {i: _by_name(steps[i][2], top) if i < len(steps) else [] for i in range(count)}


def kernel_table(events: list[dict], top: int) -> list[dict]:
    return _by_name([e for e in events if e.get("cat") in DEVICE_CATEGORIES], top)


def _by_name(kernels: list[dict], top: int) -> list[dict]:
    totals, counts = defaultdict(float), defaultdict(int)
    for e in kernels:
        totals[e["name"]] += e["dur"]
        counts[e["name"]] += 1
    names = sorted(totals, key=totals.get, reverse=True)[:top]
    return [{"kernel": n[:100], "kind": kernel_kind(n), "calls": counts[n], "total_ms": totals[n] / 1e3,
             "us_per_call": totals[n] / counts[n]} for n in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=25, help="kernels to list (default 25)")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    opts = parser.parse_args()
    if not opts.trace.exists():
        parser.error(f"{opts.trace}: no such file (make one with run_benchmark.py --trace-file PATH)")
    events = load_events(opts.trace)

    lines = [f"# Trace summary: {opts.trace.name}", "",
             "| step | host ms | device ms | busy ms | span ms | kernels | device / host |",
             "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(step_table(events)):
        ratio = row["device_ms"] / row["host_ms"] if row["host_ms"] else float("nan")
        lines.append(f"| {i} | {row['host_ms']:.1f} | {row['device_ms']:.1f} | {row['busy_ms']:.1f} | "
                     f"{row['span_ms']:.1f} | {row['kernels']} | {ratio:.2f} |")
    lines += ["", "| kernel | kind | calls | total ms | us per call |", "|---|---|---|---|---|"]
    for row in kernel_table(events, opts.top):
        lines.append(f"| `{row['kernel']}` | {row['kind']} | {row['calls']} | {row['total_ms']:.2f} | "
                     f"{row['us_per_call']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.out:
        opts.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

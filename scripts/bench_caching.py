"""Feature caching on a Hopper GPU: none vs fora / taylor / hicache at intervals 5, 6, 7, one compiled pipeline.

random:flux-dev (full-size, random weights: real cost, meaningless images), 1024^2, 50 steps, the core's best
dense stack (fused QKV + FA3 + float8 + regional compile). The cache is installed once by optimize() and its
mode/interval switched per variant (`attach_cache`), so the blocks compile once for all variants. "none" is the
same compiled pipeline with the cache in mode none: the capture hooks stay in the compiled blocks (their outputs
are matmul outputs that are materialized anyway), so the baseline carries the same blocks.

Per variant: one warm-up generation, then --runs timed ones (the denoising loop's transformer calls, timed as
run_benchmark.py times them: utils.benchmark_utils' stage timer), medians; full/forecast step counts, FLOPs speedup (FlopCounterMode,
see utils/caching.py), measured speedup over none, peak memory, and the median time of a forecast step vs a full
step. Writes <out>/caching.json (after every variant, so a cut-off run keeps what it measured), caching.md and,
unless --no_profile, the top CUDA kernels of one profiled generation of --profile (hicache N=7).

    python scripts/bench_caching.py --out runs/caching                      # H100 or H200
    python scripts/bench_caching.py --out /tmp/dry --ckpt tiny --steps 8 --intervals 2 3   # CPU dry run
Extra flags are passed to the core parser (e.g. --compile_mode default, --disable_quant).
Re-render a record's table: python scripts/bench_caching.py --rerender runs/caching/caching.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.benchmark_utils import (STAGE_TIMER, annotate_pipeline, command_line, create_parser,  # noqa: E402
                                   environment_record, pipeline_call_kwargs,
                                   resolved_defaults, stack_flags)
from utils.caching import attach_cache, describe  # noqa: E402
from utils.pipeline_utils import load_pipeline, optimize, validate_args  # noqa: E402

START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench_caching {time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def step_times(cache) -> tuple[float, dict[str, list[float]]]:
    """(the denoising loop's seconds: its transformer calls summed, as run_benchmark.py's denoising_total; per-kind
    call seconds) of the generation just run, from the product's stage timer and the cache's step kinds."""
    steps = STAGE_TIMER.collect().get("denoising_step", [])
    kinds = cache.stats()["step_kinds"]  # F full, c forecast
    per_kind: dict[str, list[float]] = {}
    for seconds, kind in zip(steps, kinds):
        per_kind.setdefault("full" if kind == "F" else "forecast", []).append(seconds)
    return sum(steps), per_kind


def main() -> None:
    own = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    own.add_argument("--out", help="directory for caching.json / caching.md")
    own.add_argument("--steps", type=int, default=50)
    own.add_argument("--size", type=int, default=None, help="image side; default 1024 (64 for tiny)")
    own.add_argument("--modes", nargs="+", default=["fora", "taylor", "hicache"])
    own.add_argument("--intervals", nargs="+", type=int, default=[5, 6, 7])
    own.add_argument("--runs", type=int, default=3, help="timed generations per variant (after one warm-up)")
    own.add_argument("--budget_s", type=float, default=450, help="skip remaining variants past this many seconds")
    own.add_argument("--no_profile", action="store_true")
    own.add_argument("--profile", default="hicache:7", help="MODE:INTERVAL profiled for one generation at the end")
    own.add_argument("--rerender", metavar="JSON", help="only rewrite JSON's .md next to it (and pooled speedups)")
    mine, core_flags = own.parse_known_args()
    if mine.rerender:
        path = Path(mine.rerender)
        record = json.loads(path.read_text())
        pool_none_baseline(record)
        path.write_text(json.dumps(record, indent=2, default=str))
        path.with_suffix(".md").write_text(markdown(record))
        return
    if not mine.out:
        own.error("--out DIR is required")
    if "--ckpt" not in core_flags:
        core_flags = ["--ckpt", "random:flux-dev", *core_flags]
    # Install the cache through the core (taylor), so optimize() picks regional compile; modes switch below.
    args = create_parser().parse_args([*core_flags, "--cache_mode", "taylor", "--num_inference_steps", str(mine.steps)])
    if mine.size:
        args.height = args.width = mine.size
    args = validate_args(resolved_defaults(args))
    out = Path(mine.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")

    log(f"loading {args.ckpt} ({args.height}x{args.width}, {args.num_inference_steps} steps)")
    pipe = optimize(load_pipeline(args), args)
    call = dict(pipeline_call_kwargs(args), output_type="latent")

    def generate():
        pipe(**call, generator=torch.Generator(device="cpu").manual_seed(args.seed))

    annotated = annotate_pipeline(pipe)  # the stage labels run_benchmark.py times with
    annotated.__enter__()
    STAGE_TIMER.enabled = True

    record = dict(script="scripts/bench_caching.py", command=command_line(), environment=environment_record(args.device),
                  stack=dict(getattr(pipe, "harness_stack", {})), stack_flags=stack_flags(args),
                  steps=args.num_inference_steps, size=[args.height, args.width], runs_per_variant=mine.runs,
                  variants=[], skipped=[])
    # "none" again at the end: its drift from the first "none" is the run's noise floor for the speedups.
    variants = [("none", None)] + [(m, n) for m in mine.modes for n in mine.intervals] + [("none", None)]
    for index, (mode, interval) in enumerate(variants):
        if time.perf_counter() - START > mine.budget_s:
            record["skipped"].append(f"{mode} N={interval}: past --budget_s {mine.budget_s}")
            log(f"skipping {mode} N={interval}: budget spent")
            continue
        cache = attach_cache(pipe, mode, **({} if interval is None else {"interval": interval}))
        label = describe(cache) + (" (repeat, noise check)" if index and mode == "none" else "")
        t0 = time.perf_counter()
        generate()  # warm-up: compiles (first variant: the blocks; first of a mode: the cheap paths), counts FLOPs
        STAGE_TIMER.collect()
        log(f"{label}: warm-up {time.perf_counter() - t0:.1f}s")
        totals, kinds, peaks = [], {}, []
        for _ in range(mine.runs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            generate()
            total, per_kind = step_times(cache)
            totals.append(total)
            for k, v in per_kind.items():
                kinds.setdefault(k, []).extend(v)
            peaks.append(torch.cuda.max_memory_allocated() if cuda else None)
        stats = cache.stats()
        row = dict(variant=label, mode=mode, interval=interval, denoise_s_median=statistics.median(totals),
                   denoise_s_all=totals, full_steps=stats["full_steps"], forecast_steps=stats["forecast_steps"],
                   step_kinds=stats["step_kinds"], flops_full_step=stats["flops_full_step"],
                   flops_forecast_step=stats["flops_forecast_step"], flops_speedup=stats["flops_speedup"],
                   cache_memory_gb=stats["cache_memory_bytes"] / 1e9, peak_memory_gb=(peaks[-1] or 0) / 1e9,
                   full_step_ms_median=1e3 * statistics.median(kinds["full"]) if "full" in kinds else None,
                   forecast_step_ms_median=1e3 * statistics.median(kinds["forecast"]) if "forecast" in kinds else None)
        if row["forecast_step_ms_median"] and row["full_step_ms_median"]:
            row["forecast_over_full"] = row["forecast_step_ms_median"] / row["full_step_ms_median"]
        base = record["variants"][0]["denoise_s_median"] if record["variants"] else None
        row["measured_speedup"] = base / row["denoise_s_median"] if base else 1.0
        record["variants"].append(row)
        log(f"{label}: {row['denoise_s_median']:.3f}s, {row['full_steps']} full / {row['forecast_steps']} forecast, "
            f"measured {row['measured_speedup']:.2f}x, FLOPs {row['flops_speedup'] or 1:.2f}x")
        (out / "caching.json").write_text(json.dumps(record, indent=2, default=str))

    if not mine.no_profile and len(record["variants"]) > 1 and time.perf_counter() - START < mine.budget_s + 30:
        mode, interval = mine.profile.split(":")
        cache = attach_cache(pipe, mode, interval=int(interval))
        generate()  # the cheap paths of this mode are compiled already; one untimed run all the same
        STAGE_TIMER.collect()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            generate()
        STAGE_TIMER.collect()
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        record["profile_variant"] = describe(cache)
        (out / "caching_profile.txt").write_text(f"{record['profile_variant']}, one generation\n" +
                                                 prof.key_averages().table(sort_by=sort, row_limit=30))
        log("profile written")

    STAGE_TIMER.enabled = False
    annotated.__exit__(None, None, None)
    pool_none_baseline(record)
    (out / "caching.json").write_text(json.dumps(record, indent=2, default=str))
    (out / "caching.md").write_text(markdown(record))
    print(markdown(record))
    log("done")


def pool_none_baseline(record: dict) -> None:
    """Speedups against the median of every timed "none" generation (first and repeat pooled): the two "none"
    variants bracket the run, so GPU drift between them shows up in the baseline, not in one variant's speedup."""
    nones = [t for r in record["variants"] if r["mode"] == "none" for t in r["denoise_s_all"]]
    if nones:
        record["none_pooled_s_median"] = statistics.median(nones)
        for r in record["variants"]:
            r["speedup_vs_pooled_none"] = record["none_pooled_s_median"] / r["denoise_s_median"]


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [f"# Feature caching, {env.get('gpu') or env.get('cpu')}: {record['steps']} steps, "
             f"{record['size'][0]}x{record['size'][1]}", "",
             "Stack: " + "; ".join(f"{k}: {v}" for k, v in record["stack"].items()), "",
             "| variant | denoise s (median) | full / forecast steps | FLOPs speedup | measured speedup (vs first none) | "
             "measured speedup (vs pooled none) | full step ms | forecast step ms | forecast / full | cache GB | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in record["variants"]:
        lines.append(f"| {r['variant']} | {r['denoise_s_median']:.3f} | {r['full_steps']} / {r['forecast_steps']} | "
                     f"{fmt(r['flops_speedup'], '.2f')} | {r['measured_speedup']:.2f} | "
                     f"{fmt(r.get('speedup_vs_pooled_none'), '.2f')} | "
                     f"{fmt(r['full_step_ms_median'], '.1f')} | {fmt(r['forecast_step_ms_median'], '.2f')} | "
                     f"{fmt(r.get('forecast_over_full'), '.1%')} | {r['cache_memory_gb']:.2f} | {r['peak_memory_gb']:.1f} |")
    if record.get("none_pooled_s_median"):
        lines += ["", f"Pooled none: median of all {sum(r['mode'] == 'none' for r in record['variants'])} none variants' "
                      f"timed runs, {record['none_pooled_s_median']:.3f} s."]
    if record["skipped"]:
        lines += ["", "Skipped: " + "; ".join(record["skipped"])]
    lines += ["", f"Command: `{record['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""The interval=1 three-way check (ALGORITHMS.md section 4): is caching on top of Chipmunk wired right?

Same prompt, seed and steps, four runs:
  A: dense, no caching            B: dense + HiCache at interval=1
  C: Chipmunk, no caching         D: Chipmunk + HiCache at interval=1
Interval=1 makes every step a full step, so with a correct integration B must equal A bitwise and D
must equal C (within `tolerance`, relative L2 error of the final latents). Neither the caching layer nor
Chipmunk has an interval=1 branch: the equalities must fall out of their schedules. D vs B (Chipmunk's
own deviation from dense) is reported for information.

    python run_benchmark.py --check interval1 --ckpt tiny --disable_bf16 --chipmunk_config configs/chipmunk-tiny.yml
    python run_benchmark.py --check interval1 --ckpt random:flux-dev --height 768 --width 1280 \
        --num_inference_steps 12 --chipmunk_config configs/chipmunk-flux.yml

Exits non-zero when a condition fails, for CI. All four runs use the same compile setting: eager unless
--compile_export_mode compile is given (then regional compile for all four), so that A and B run the
same kernels.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
from typing import Any, Callable

import torch

DEFAULT_TOLERANCE = 1e-3
RUNS = {  # name: (chipmunk on, hicache on)
    "A": (False, False),
    "B": (False, True),
    "C": (True, False),
    "D": (True, True),
}


def default_chipmunk_config(ckpt: str) -> str:
    return "configs/chipmunk-tiny.yml" if ckpt == "tiny" else "configs/chipmunk-flux.yml"


def variant_args(args: argparse.Namespace, chipmunk: bool, hicache: bool) -> argparse.Namespace:
    v = copy.copy(args)
    v.check = None
    v.chipmunk_config = (args.chipmunk_config or default_chipmunk_config(args.ckpt)) if chipmunk else None
    v.disable_chipmunk = False
    v.cache_mode, v.disable_cache, v.cache_dit_config = ("hicache" if hicache else "none"), False, None
    v.interval = 1
    if args.compile_export_mode in (None, "disabled"):
        v.compile_export_mode = "disabled"
    else:  # export_aoti cannot hold caching/Chipmunk: compile all four the same way
        v.compile_export_mode, v.compile_scope = "compile", "regional"
    return v


def final_latents(args: argparse.Namespace) -> torch.Tensor:
    """One generation with the stack `args` describes; returns the final latents (float32, CPU)."""
    from utils.benchmark_utils import pipeline_call_kwargs, set_rand_seeds
    from utils.pipeline_utils import load_pipeline, optimize, validate_args

    validate_args(args)
    set_rand_seeds(args.seed)
    pipeline = load_pipeline(args)
    optimize(pipeline, args)
    with torch.no_grad():
        latents = pipeline(**pipeline_call_kwargs(args), generator=torch.manual_seed(args.seed),
                           output_type="latent").images
    latents = latents.float().cpu()
    del pipeline
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return latents


def compare(x: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Relative L2 error, PSNR (peak = the reference's value range) and max abs difference."""
    diff = (x - ref).double()
    mse = float(diff.pow(2).mean())
    peak = float(ref.max() - ref.min())
    return {
        "rel_error": float(diff.norm() / ref.double().norm().clamp_min(1e-30)),
        "psnr_db": math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse),
        "max_abs": float(diff.abs().max()),
        "bitwise_equal": bool(torch.equal(x, ref)),
        "finite": bool(torch.isfinite(x).all()),
    }


def run_interval1_check(args: argparse.Namespace, tolerance: float = DEFAULT_TOLERANCE,
                        latents_of: Callable[[argparse.Namespace], torch.Tensor] = final_latents
                        ) -> tuple[list[dict[str, Any]], bool]:
    """Run A, B, C, D and return (table rows, passed)."""
    latents = {}
    for name, (chipmunk, hicache) in RUNS.items():
        print(f"[interval1] run {name}: chipmunk={'on' if chipmunk else 'off'}, "
              f"hicache={'interval 1' if hicache else 'off'}")
        latents[name] = latents_of(variant_args(args, chipmunk, hicache))
    rows = []
    for pair, condition in (("B vs A", "bitwise equal"), ("D vs C", f"rel. error <= {tolerance:g}"),
                            ("D vs B", "(information)")):
        x, ref = latents[pair[0]], latents[pair[-1]]
        row = {"pair": pair, "condition": condition, **compare(x, ref)}
        if pair == "B vs A":
            row["passed"] = row["bitwise_equal"] and row["finite"]
        elif pair == "D vs C":
            row["passed"] = row["rel_error"] <= tolerance and row["finite"]
        else:
            row["passed"] = None
        rows.append(row)
    return rows, all(r["passed"] for r in rows if r["passed"] is not None)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| pair | rel. L2 error | PSNR (dB) | max abs | bitwise | condition | result |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "info" if r["passed"] is None else ("PASS" if r["passed"] else "FAIL")
        lines.append(f"| {r['pair']} | {r['rel_error']:.3e} | {r['psnr_db']:.2f} | {r['max_abs']:.3e} | "
                     f"{'yes' if r['bitwise_equal'] else 'no'} | {r['condition']} | {result} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """CLI entry (`run_benchmark.py --check interval1`): prints the table, writes JSON + markdown under
    --results_dir, returns the exit status (1 on failure)."""
    from utils.benchmark_utils import write_check_record

    tolerance = getattr(args, "check_tolerance", None) or DEFAULT_TOLERANCE
    rows, passed = run_interval1_check(args, tolerance)
    table = format_table(rows)
    fields = {"chipmunk_config": args.chipmunk_config or default_chipmunk_config(args.ckpt),
              "hicache": {"max_order": args.max_order, "first_enhance": args.first_enhance,
                          "hicache_scale": args.hicache_scale, "interval": 1},
              "compile_export_mode": variant_args(args, False, False).compile_export_mode,
              "tolerance": tolerance, "rows": rows, "passed": passed}
    path = write_check_record("interval1", args, fields, f"interval=1 three-way check: {'PASS' if passed else 'FAIL'}",
                              table)
    print(table)
    print(f"[interval1] {'PASS' if passed else 'FAIL'}; record {path}")
    return 0 if passed else 1

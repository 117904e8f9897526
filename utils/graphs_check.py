"""The step graphs check (`run_benchmark.py --check graphs --compile_mode reduce-overhead ...`): does replaying the
recorded steps compute what the same compiled stack computes eagerly?

In one process, on one pipeline compiled once: three generations without the graphs, then three with the step
graphs installed (the first runs each step kind eagerly once and captures it at its second occurrence, the second
captures the kinds seen once per generation, the third only replays). The first generation is the warm-up: it
compiles, and feature caching counts the FLOPs of the first step of each kind in eager PyTorch (compiled kernels
bypass the counter), so its latents round apart from every later generation's. The second is the reference; the
third's difference from it is the run-to-run floor (0 on a deterministic stack). Same seed throughout; every
generation's latents, its feature-cache step kinds and Chipmunk's per-layer decision counts are compared with the
reference's. Passes when every graphed generation equals the reference bit for bit and takes the same decisions,
and installing the graphs compiled no new graph (a recompile retunes kernels, which can round differently).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

from utils.compile_utils import CUDAGRAPH_MODES, WITHOUT_CUDAGRAPHS
from utils.interval1_check import compare

REFERENCE = "eager 2"  # the first generation after the warm-up one (see above)


def _decisions(pipeline) -> dict[str, Any]:
    """What the step-dependent layers did in the last generation (cumulative Chipmunk counts, cache step kinds)."""
    from utils.chipmunk import chipmunk_stats

    cache = getattr(pipeline.transformer, "harness_cache", None)
    return {"chipmunk": chipmunk_stats(pipeline), "cache_steps": cache.stats()["step_kinds"] if cache else None}


def run_graphs_check(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """(one row per generation, the graphs' call counts (the step's; with --text_encoder_graphs each encoder's
    layers' too, the encoders' prompt embeddings then part of what the latents compare), passed). `args`: a
    validated stack with a CUDA-graph --compile_mode."""
    from torch._dynamo.utils import counters

    from utils import compile_utils
    from utils.benchmark_utils import pipeline_call_kwargs, set_rand_seeds
    from utils.pipeline_utils import load_pipeline, optimize
    from utils.step_graphs import encoder_graphs, install_encoder_graphs, install_step_graphs

    eager_args = copy.copy(args)
    eager_args.compile_mode = WITHOUT_CUDAGRAPHS[args.compile_mode]  # the same compiled blocks, no graphs
    eager_args.text_encoder_graphs = False  # installed below, with the step's
    set_rand_seeds(args.seed)
    pipeline = optimize(load_pipeline(eager_args), eager_args)

    def generate() -> tuple[torch.Tensor, float, dict, int]:
        compiled = counters["stats"]["unique_graphs"]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        latents = pipeline(**pipeline_call_kwargs(args), generator=torch.manual_seed(args.seed),
                           output_type="latent").images.float()
        torch.cuda.synchronize()
        return latents.cpu(), time.perf_counter() - t0, _decisions(pipeline), counters["stats"]["unique_graphs"] - compiled

    runs = {name: generate() for name in ("eager 1", "eager 2", "eager 3")}
    status = install_step_graphs(pipeline.transformer)
    encoders = compile_utils.flux_text_encoders(pipeline) if args.text_encoder_graphs else []
    for model in encoders:
        install_encoder_graphs(model)
    print(f"[graphs] installed: {status}" + (f"; the layers of {len(encoders)} text encoders" if encoders else ""))
    for i in (1, 2, 3):
        runs[f"graphs {i}"] = generate()
    rows, passed = judge(runs)
    calls = dict(pipeline.transformer.step_graphs.calls)
    calls.update({f"{type(model).__name__} layers": dict(encoder_graphs(model).calls) for model in encoders})
    return rows, calls, passed


def judge(runs: dict[str, tuple[torch.Tensor, float, dict, int]]) -> tuple[list[dict[str, Any]], bool]:
    """Rows and verdict from {run name: (latents, seconds, decisions, graphs compiled)}, in run order: each
    generation against the reference, with its own decisions (Chipmunk's counts are cumulative over generations)."""
    decided, previous = {}, None
    for name, (_, _, decisions, _) in runs.items():
        chipmunk = decisions["chipmunk"]
        decided[name] = {"cache_steps": decisions["cache_steps"], "chipmunk": chipmunk if previous is None else {
            layer: {k: n - previous[layer][k] for k, n in counts.items()} for layer, counts in chipmunk.items()}}
        previous = chipmunk
    reference = runs[REFERENCE][0]
    rows = [{"run": name, "seconds": seconds, **compare(latents, reference),
             "same_decisions": decided[name] == decided[REFERENCE], "graphs_compiled": compiled}
            for name, (latents, seconds, _, compiled) in runs.items()]
    graphed = [r for r in rows if r["run"].startswith("graphs")]
    return rows, all(r["bitwise_equal"] and r["same_decisions"] and r["graphs_compiled"] == 0 for r in graphed)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"| run | s | rel. error vs {REFERENCE} | bitwise | same decisions | graphs compiled |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['seconds']:.2f} | {r['rel_error']:.2e} | {'yes' if r['bitwise_equal'] else 'no'} | "
              f"{'yes' if r['same_decisions'] else 'NO'} | {r['graphs_compiled']} |" for r in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """CLI entry: prints the table, writes JSON + markdown under --results_dir, returns 1 on failure."""
    from utils.benchmark_utils import stack_flags, write_check_record
    from utils.errors import StackError

    if args.compile_export_mode != "compile" or args.compile_mode not in CUDAGRAPH_MODES:
        raise StackError("--check graphs compares the step graphs with the same compiled stack run eagerly: pass "
                         "--compile_export_mode compile --compile_mode reduce-overhead")
    rows, calls, passed = run_graphs_check(args)
    table = format_table(rows)
    path = write_check_record("graphs", args, {"stack_flags": stack_flags(args), "graph_calls": calls, "rows": rows,
                                               "passed": passed},
                              f"Step graphs vs eager: {'PASS' if passed else 'FAIL'}",
                              f"graph calls: {calls}\n\n{table}")
    print(table)
    print(f"[graphs] {'PASS' if passed else 'FAIL'} (graph calls {calls}); record {path}")
    return 0 if passed else 1

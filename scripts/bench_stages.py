"""The cumulative stage table (as flux-fast did for Schnell), in one process on one loaded pipeline:

    bf16 eager -> + compile -> + QKV fusion -> + FA3 bf16 -> + FA3 fp8 -> + float8 quant -> + sigmoid GELU
    -> + inductor flags (optimize() applies these two as one layer: its inductor tuning)
    -> + CUDA graphs (the compiled forward recorded whole)

Listed in --stages only when asked for: persistent_reductions (an experiment, before inductor_flags) and
export_aoti + CUDA graphs (last).

Each stage adds one layer to the previous stage's pipeline through the same functions optimize() uses,
re-compiles (regional compile of the repeated blocks unless --compile_scope full), then records the
transformer's per-step time (CUDA-event median over --step_runs direct forwards at the pipeline's
shapes) and the end-to-end seconds (median over --e2e_runs full pipeline calls after one warm-up).
Results are written after every stage, so a run cut short still leaves its finished rows.

    python scripts/bench_stages.py --ckpt random:flux-dev --num_inference_steps 28 --out runs/stages

A table too long for one command is split: the second command applies the earlier layers untimed (`--timed`;
compiling only for the timed stages), and times eager again as its own reference, e.g.

    python scripts/bench_stages.py --stages eager,compile,qkv_fusion,fa3_bf16,fa3_fp8,float8_quant,sigmoid_gelu,\
inductor_flags,cudagraphs,export_aoti --timed eager,inductor_flags,cudagraphs,export_aoti --out runs/stages
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import compile_utils  # noqa: E402
from utils.attention import FA3FluxAttnProcessor, fa3_unavailable_reason  # noqa: E402
from utils.benchmark_utils import (command_line, create_parser, device_kernel_times,  # noqa: E402
                                   environment_record, ms_by_kind, pipeline_call_kwargs, resolved_defaults, time_call)
from utils.pipeline_utils import load_pipeline, quantize_float8  # noqa: E402
from utils.step_graphs import install_step_graphs  # noqa: E402

STAGES = ("eager", "compile", "qkv_fusion", "fa3_bf16", "fa3_fp8", "float8_quant", "sigmoid_gelu",
          "persistent_reductions", "inductor_flags", "cudagraphs", "export_aoti")
TOP_KERNELS = 30  # kernels kept per timed stage in the record: enough to name every kind's largest items


def median_ms(fn, runs: int, device: str) -> float:
    return 1e3 * statistics.median(time_call(fn, device)[0] for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default="random:flux-dev")
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--stages", default=",".join(s for s in STAGES if s not in ("persistent_reductions",
                                                                                   "export_aoti")),
                        help=f"comma list from {STAGES}")
    parser.add_argument("--compile_scope", default="regional", choices=("regional", "full"))
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode (default: inductor's default)")
    parser.add_argument("--quant_granularity", default="row", choices=("tensor", "row"))
    parser.add_argument("--step_runs", type=int, default=10)
    parser.add_argument("--e2e_runs", type=int, default=2)
    parser.add_argument("--cache-dir", dest="cache_dir", default="/tmp/flux-harness-aoti")
    parser.add_argument("--out", default="runs/stages")
    parser.add_argument("--device", default="cuda", help="cpu only for a dry run with --ckpt tiny")
    parser.add_argument("--timed", default=None,
                        help="comma list: time only these stages; the others are applied (cumulatively) untimed and "
                             "not compiled (default: time every stage)")
    parser.add_argument("--aoti_build_only", choices=("double", "single"), default=None,
                        help="apply the stages untimed, build this block kind's export_aoti package into --cache-dir "
                             "and exit. Run beside the timed process (same arguments otherwise): the two block kinds "
                             "then build at once (on the H200 the single block's 97 s within the double block's "
                             "328 s), the timed process waiting for this package (a lock) instead of building it")
    parser.add_argument("--deadline_s", type=float, default=None,
                        help="skip the remaining stages once this many seconds have passed (results so far are kept)")
    opts = parser.parse_args()
    stages = opts.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    timed = opts.timed.split(",") if opts.timed else stages
    if opts.aoti_build_only:
        if "export_aoti" not in stages or opts.compile_scope != "regional":
            parser.error("--aoti_build_only builds one block kind of the regional export: list export_aoti in "
                         "--stages and keep --compile_scope regional")
        timed = []  # a builder times nothing and writes no record
    elif set(timed) - set(stages) or "eager" not in timed:
        parser.error("--timed must be a subset of --stages that includes eager (the reference of the run)")
    for stage in ("sigmoid_gelu", "persistent_reductions", "inductor_flags"):
        if stage in timed and "compile" not in stages:
            parser.error(f"{stage} only acts on compiled code: list compile in --stages (it may stay untimed)")

    args = resolved_defaults(create_parser().parse_args(
        ["--ckpt", opts.ckpt, "--height", str(opts.height), "--width", str(opts.width), "--device", opts.device]
        + (["--num_inference_steps", str(opts.num_inference_steps)] if opts.num_inference_steps else [])))
    t0 = time.perf_counter()
    pipe = load_pipeline(args)
    load_s = time.perf_counter() - t0
    transformer = pipe.transformer
    example = compile_utils.transformer_example_kwargs(pipe, args.height, args.width, args.max_sequence_length)
    # Called as the pipeline calls it (joint_attention_kwargs={}), so the compiled blocks' guards match
    # and the pipeline runs reuse the same graphs instead of compiling a second set.
    step_kwargs = {**example, "joint_attention_kwargs": {}, "return_dict": False}
    name = f"stages_{opts.ckpt.replace(':', '_')}_{args.height}x{args.width}_{args.num_inference_steps}steps"
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"kind": "cumulative_stage_table", "command": "python scripts/" + command_line(),
              "environment": environment_record(opts.device), "random_weights": pipe.harness_random_weights,
              "ckpt": opts.ckpt, "load_s": load_s,
              "shapes": {"height": args.height, "width": args.width, "steps": args.num_inference_steps,
                         "max_sequence_length": args.max_sequence_length, "batch": 1,
                         "image_tokens": example["hidden_states"].shape[1]},
              "compile_scope": opts.compile_scope, "compile_mode": opts.compile_mode or "default",
              "quant_granularity": opts.quant_granularity, "step_runs": opts.step_runs,
              "e2e_runs": opts.e2e_runs, "rows": [],
              "applied_untimed": [stage for stage in stages if stage not in timed]}
    fa3_reason = fa3_unavailable_reason()
    compiled = False
    compile_mode = opts.compile_mode or "default"

    def record_failure(stage: str, error: Exception, where: str = "") -> None:
        traceback.print_exc()
        first_line = (str(error).splitlines() or [""])[0]
        record.setdefault("failed", {})[stage] = f"{where}{type(error).__name__}: {first_line}"
        print(f"[stage] {stage:<15} FAILED: {record['failed'][stage]}", flush=True)
        (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
        write_markdown(record, out_dir / f"{name}.md")

    def recompile():
        torch._dynamo.reset()
        compile_utils.compile_transformer(transformer, opts.compile_scope, compile_mode)

    for stage in stages:
        if opts.deadline_s and time.perf_counter() - t0 > opts.deadline_s:
            print(f"[stage] deadline of {opts.deadline_s:.0f} s reached: {stage} and later stages not run", flush=True)
            record["not_run"] = stages[stages.index(stage):]
            (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
            break
        note = ""
        t_apply = time.perf_counter()
        if stage == "compile":
            compiled = True
        elif stage == "qkv_fusion":
            transformer.fuse_qkv_projections()
        elif stage in ("fa3_bf16", "fa3_fp8"):
            if fa3_reason:
                note = f"FA3 unavailable ({fa3_reason}); SDPA kept"
            else:
                transformer.set_attn_processor(FA3FluxAttnProcessor(fp8=stage == "fa3_fp8"))
        elif stage == "float8_quant":
            note = quantize_float8(transformer, opts.quant_granularity) if opts.device.startswith("cuda") else "skipped on CPU"
        elif stage == "sigmoid_gelu":  # optimize() applies it in its inductor layer; timed apart here
            note = f"tanh-GELU as x*sigmoid(2u) in {compile_utils.use_sigmoid_gelu(transformer)} MLPs"
        elif stage == "persistent_reductions":  # part of the inductor_flags layer; this stage times it untuned
            compile_utils.set_inductor_flags(compile_utils.PERSISTENT_REDUCTION_FLAGS)
            note = "inductor multi_kernel=1: persistent (one-read) row reductions where they benchmark faster"
        elif stage == "inductor_flags":
            note = ", ".join(f"{k}={v}" for k, v in compile_utils.set_inductor_tuning_flags().items())
        elif stage == "cudagraphs":  # the same compiled blocks and glue, replayed as one graph: no host work
            compiled = True
            note = "the whole forward as one CUDA graph" if opts.device.startswith("cuda") else \
                "CPU dry run: no CUDA graphs"
        elif stage == "export_aoti":
            if hasattr(transformer.forward, "eager_forward"):  # the step graph of the cudagraphs stage
                transformer.forward = transformer.forward.eager_forward
            torch._dynamo.reset()
            for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
                block._compiled_call_impl = None  # export the plain modules, not the compiled wrappers
            exported_layers = [s for s in stages[:stages.index(stage)] if s != "cudagraphs"]  # what the graph holds
            key = compile_utils.export_cache_key(pipe, example, {"stages": exported_layers,
                                                                 "quant": opts.quant_granularity})
            if opts.aoti_build_only:
                _, status = compile_utils.load_or_build_regional_aoti(transformer, example, key, opts.cache_dir,
                                                                      kinds=(opts.aoti_build_only,))
                print(f"[stage] {stage:<15} {status} (build only: nothing timed)", flush=True)
                return
            with torch.no_grad():  # the same layers run eagerly: what the packages must reproduce
                export_reference = transformer(**step_kwargs)[0].float()
            build = (compile_utils.load_or_build_regional_aoti if opts.compile_scope == "regional"  # per block kind
                     else compile_utils.load_or_build_aoti)  # the whole model: > 8 min cold on the H200 host
            try:
                aoti, status = build(transformer, example, key, opts.cache_dir)
                t_run = time.perf_counter()
                with torch.no_grad():
                    aoti(**example)  # the packages run by themselves before a CUDA graph records them
                first_run_s = time.perf_counter() - t_run
            except Exception as e:  # a loader crash (found in a child), a failed build or run: keep the rows so far
                record_failure(stage, e)
                continue
            cuda = opts.device.startswith("cuda")
            compile_utils.install_compiled_forward(transformer, compile_utils.cudagraph(aoti) if cuda else aoti)
            note = (f"AOTI packages {status}; first run {first_run_s:.1f} s"
                    + (" + CUDA graphs" if cuda else " (CPU dry run: no CUDA graphs)"))
        if stage not in timed:
            print(f"[stage] {stage:<15} applied, not timed {note}", flush=True)
            continue
        if compiled and stage != "export_aoti":
            recompile()
        if stage == "cudagraphs" and opts.device.startswith("cuda"):
            install_step_graphs(transformer)
        try:
            with torch.no_grad():
                transformer(**step_kwargs)  # compiles (cold) when needed
        except Exception as e:  # the packages ran, their CUDA graph's capture did not: keep the rows
            if stage != "export_aoti":
                raise
            record_failure(stage, e, "CUDA graph capture: ")
            continue
        apply_s = time.perf_counter() - t_apply
        with torch.no_grad():
            step_ms = median_ms(lambda: transformer(**step_kwargs), opts.step_runs, opts.device)
            kernels = device_kernel_times(lambda: transformer(**step_kwargs))  # where the step's device time goes
        step_kinds = ms_by_kind(kernels)
        run = lambda: pipe(**pipeline_call_kwargs(args), generator=torch.manual_seed(0), output_type="pil")  # noqa: E731
        run()  # warm-up of the whole pipeline (text encoders, VAE)
        cuda = opts.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        e2e_s = median_ms(run, opts.e2e_runs, opts.device) / 1e3
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        row = {"stage": stage, "dynamo_graphs_so_far": graphs, "step_ms": step_ms, "e2e_s": e2e_s, "apply_and_compile_s": apply_s,
               "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               "step_device_ms_by_kind": step_kinds, "top_kernels": kernels[:TOP_KERNELS], "note": note}
        if stage == "export_aoti":  # the packages under their CUDA graph against the same stack run eagerly
            with torch.no_grad():
                got = transformer(**step_kwargs)[0].float()
            row["rel_err_vs_same_stack_eager"] = ((got - export_reference).norm() / export_reference.norm()).item()
            row["note"] += f"; output vs the same layers eager: relative error {row['rel_err_vs_same_stack_eager']:.1e}"
        record["rows"].append(row)
        eager = record["rows"][0]
        for r in record["rows"]:
            r["step_vs_eager"] = r["step_ms"] / eager["step_ms"]
            r["e2e_speedup"] = eager["e2e_s"] / r["e2e_s"]
        print(f"[stage] {stage:<15} step {step_ms:7.1f} ms  e2e {e2e_s:6.2f} s  "
              f"(apply+compile {apply_s:5.1f} s) {row['note']}", flush=True)
        if step_kinds:
            print(f"[stage] {'':<15} device ms: {kinds_text(step_kinds)}", flush=True)
            for k in kernels[:12]:
                print(f"[stage] {'':<15}   {k['ms']:6.2f} ms {k['calls']:5.0f}x  {k['kernel'][:150]}", flush=True)
        (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
        write_markdown(record, out_dir / f"{name}.md")


def write_markdown(record: dict, path: Path) -> None:
    env, shapes = record["environment"], record["shapes"]
    untimed = record.get("applied_untimed")
    lines = [f"# Cumulative stage table: {record['ckpt']} (random weights: {record['random_weights']})", "",
             f"GPU {env['gpu']}, torch {env['torch']}, diffusers {env['diffusers']}, torchao {env['torchao']}, "
             f"FA3 {env['fa3']}; {shapes['height']}x{shapes['width']}, {shapes['steps']} steps, "
             f"{shapes['image_tokens']} image + {shapes['max_sequence_length']} text tokens, batch 1; compile "
             f"{record['compile_scope']} (mode {record['compile_mode']}), float8 {record['quant_granularity']}-wise. "
             f"Step: median of {record['step_runs']} CUDA-event-timed transformer forwards; end to end: median of "
             f"{record['e2e_runs']} pipeline calls after a warm-up.", "",
             f"Command: `{record['command']}`", "",
             *([f"Applied but not timed in this run (timed in another): {', '.join(untimed)}.", ""] if untimed else []),
             "| stage (cumulative) | transformer step ms | x eager step | end-to-end s | e2e speedup | apply+compile s | "
             "step device ms by kernel kind (profiler) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['stage']} | {r['step_ms']:.1f} | {r['step_vs_eager']:.3f} | {r['e2e_s']:.2f} | "
                     f"{r['e2e_speedup']:.2f}x | {r['apply_and_compile_s']:.0f} | "
                     f"{kinds_text(r.get('step_device_ms_by_kind') or {})} | {r['note']} |")
    lines += [f"| {stage} | failed | | | | | | {why} |" for stage, why in record.get("failed", {}).items()]
    for r in record["rows"]:
        if r.get("top_kernels"):
            lines += ["", f"Largest kernels of one `{r['stage']}` step (device ms and launches per step):", "",
                      "| ms | launches | kind | kernel |", "|---|---|---|---|"]
            lines += [f"| {k['ms']:.2f} | {k['calls']:.0f} | {k['kind']} | `{k['kernel'][:150]}` |"
                      for k in r["top_kernels"][:15]]
    path.write_text("\n".join(lines) + "\n")


def kinds_text(kinds: dict[str, float]) -> str:
    """Device ms per kernel kind, after their total: a total well under the step's time means launch-bound."""
    if not kinds:
        return ""
    return f"total {sum(kinds.values()):.1f}: " + ", ".join(f"{kind} {ms:.1f}" for kind, ms in kinds.items())


if __name__ == "__main__":
    main()

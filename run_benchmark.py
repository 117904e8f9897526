"""Benchmark one configuration of the stack: warm-up, N timed runs, per-stage breakdown, FLOPs,
peak memory, an optional Chrome trace, and a JSON record plus a markdown row under --results_dir.

    python run_benchmark.py --ckpt tiny --num_runs 3
    python run_benchmark.py --ckpt random:flux-dev --num_inference_steps 28 --trace-file trace.json.gz
    python run_benchmark.py --ckpt random:flux-kontext --image tests/fixtures/edits/gradient.png
    python run_benchmark.py --ckpt random:qwen-image --cache_mode hicache --interval 7
    torchrun --nproc-per-node 2 run_benchmark.py --ckpt random:flux-dev --context_parallel ulysses

Under torchrun (--context_parallel) every rank runs every generation (the attention's collectives need them all);
rank 0 alone writes the record: world size, every rank's peak memory and median latency, and rank 0's latencies.
"""

import re
import statistics

import torch
from tqdm import tqdm

from utils.benchmark_utils import (STAGE_TIMER, annotate_pipeline, check_args, command_line, create_parser,
                                   environment_record, pipeline_call_kwargs, resolved_defaults, set_rand_seeds,
                                   stack_flags, summarize, time_call, transformer_flops, write_record)
from utils.errors import StackError


def run_once(pipeline, args):
    return pipeline(**pipeline_call_kwargs(args), generator=torch.manual_seed(args.seed), output_type="pil").images[0]


def warm_up(pipeline, run, runs: int, max_extra: int = 2) -> int:
    """`runs` warm-up generations, then more (at most `max_extra`) while the CUDA graphs (the step's, the text
    encoders') still have a step kind or a prompt shape to capture: a kind is captured at its second occurrence, and step 1's occurs once per generation, so without
    this the first timed run pays its capture (on the H200 it was 5.04-5.15 s against 4.87-4.93 for the later runs).
    Returns the number of warm-up generations run."""
    from utils import parallel

    for _ in tqdm(range(runs), desc="warm-up", disable=not parallel.is_main()):
        run()
    from utils.step_graphs import pipeline_graphs

    graphs = pipeline_graphs(pipeline)
    done = runs

    def uncaptured() -> int:
        return sum(g.uncaptured_kinds() for g in graphs)

    while runs and uncaptured() and done < runs + max_extra:
        print(f"[bench] CUDA graphs: {uncaptured()} step kind(s) or prompt shape(s) seen once and not captured yet "
              f"(captured at their second occurrence): one more warm-up run")
        run()
        done += 1
    return done


def main(argv=None):
    parser = create_parser()
    args = resolved_defaults(parser.parse_args(argv))
    try:
        check_args(args)  # the flags alone, before the stack's imports
    except ValueError as e:
        parser.error(str(e))
    from utils import parallel
    from utils.pipeline_utils import load_pipeline, optimize, validate_args

    if args.check == "interval1":
        from utils.interval1_check import main as interval1_main

        try:
            raise SystemExit(interval1_main(args))
        except StackError as e:
            parser.error(str(e))
    try:
        validate_args(args)
        if args.check == "graphs":
            from utils.graphs_check import main as graphs_main

            raise SystemExit(graphs_main(args))
    except StackError as e:
        parser.error(str(e))
    if args.num_runs < 1 or args.warmup_runs < 0:
        parser.error("--num_runs must be >= 1 and --warmup_runs >= 0")
    set_rand_seeds(args.seed)
    pipeline = load_pipeline(args)
    flops = transformer_flops(pipeline, args)
    optimize(pipeline, args)
    cuda = args.device.startswith("cuda")

    with annotate_pipeline(pipeline):
        warmup_runs = warm_up(pipeline, lambda: run_once(pipeline, args), args.warmup_runs)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        latencies, stages = [], {}
        STAGE_TIMER.enabled = True
        for _ in tqdm(range(args.num_runs), desc="timed runs", disable=not parallel.is_main()):
            parallel.barrier()  # ranks start each generation together: rank 0's latency is the image's
            seconds, image = time_call(lambda: run_once(pipeline, args), args.device)
            latencies.append(seconds)
            for label, values in STAGE_TIMER.collect().items():
                stages.setdefault(label, []).append(sum(values) if label != "denoising_step" else values)
        STAGE_TIMER.enabled = False
        if args.trace_file:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities, record_shapes=True) as prof:
                run_once(pipeline, args)
            if parallel.is_main():
                prof.export_chrome_trace(args.trace_file)
                print(f"Chrome trace written to {args.trace_file}")

    per_step = [s for run in stages.get("denoising_step", []) for s in run]
    breakdown = {label: summarize(v) for label, v in stages.items() if label != "denoising_step"}
    breakdown["denoising_step"] = summarize(per_step)
    breakdown["denoising_total"] = summarize([sum(run) for run in stages["denoising_step"]])
    record = {
        "kind": "run_benchmark",
        "command": command_line(argv, "run_benchmark.py"),
        "environment": environment_record(args.device),
        "random_weights": pipeline.harness_random_weights,
        "ckpt": args.ckpt,
        "shapes": {"height": args.height, "width": args.width, "steps": args.num_inference_steps,
                   "max_sequence_length": args.max_sequence_length, "batch": 1,
                   "guidance_scale": args.guidance_scale},
        "input_image": args.image,
        "stack_flags": stack_flags(args),
        "stack": pipeline.harness_stack,
        "warmup_runs": warmup_runs,
        "latency_s": summarize(latencies),
        "latencies_s": latencies,
        "stages_s": breakdown,
        "transformer_flops_per_forward": flops,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    record.update(parallel_fields(args, record["peak_memory_gb"], latencies))
    if not parallel.is_main():
        parallel.shutdown()
        return None
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"bench_{args.ckpt}_{args.height}x{args.width}_{args.num_inference_steps}steps"
                                                   f"_{record['environment']['timestamp_utc']}")
    gpu = record["environment"]["gpu"] or "cpu"
    if record["world_size"] > 1:
        gpu = f"{record['world_size']}x {gpu} ({args.context_parallel})"
    row = {"ckpt": args.ckpt + (" (random weights)" if record["random_weights"] else ""),
           "gpu": gpu, "size": f"{args.height}x{args.width}",
           "steps": args.num_inference_steps, "compile": args.compile_export_mode,
           "median s": f"{record['latency_s']['median']:.3f}",
           "step ms": f"{1e3 * breakdown['denoising_step']['median']:.1f}",
           "TFLOP/fwd": f"{flops / 1e12:.3g}", "record": name + ".json"}
    path = write_record(record, args.results_dir, name, row)
    print(f"median {record['latency_s']['median']:.3f} s (min {record['latency_s']['min']:.3f}, "
          f"max {record['latency_s']['max']:.3f}) over {args.num_runs} runs; transformer step "
          f"{1e3 * breakdown['denoising_step']['median']:.1f} ms; record {path}")
    parallel.shutdown()
    return record


def parallel_fields(args, peak_memory_gb, latencies) -> dict:
    """The record's launch fields; under torchrun every rank's peak memory and median latency (gathered: every
    rank calls this), the record's own latencies being rank 0's."""
    from utils import parallel

    ranks = parallel.gather({"rank": parallel.rank(), "peak_memory_gb": peak_memory_gb,
                             "peak_host_rss_gb": parallel.peak_host_rss_gb(),
                             "latency_median_s": statistics.median(latencies)})
    return {"world_size": parallel.world_size(), "context_parallel": args.context_parallel,
            "latency_from_rank": 0, "ranks": ranks}


if __name__ == "__main__":
    main()

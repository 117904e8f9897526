"""Run an ablation sweep from a YAML config: every variant over every (prompt, seed), timed, with
quality metrics against the baseline variant, and paper tables and plots under the output_dir.

    python run_ablation.py --config configs/ablations/smoke.yaml                 # see it work (CPU, ~30 s)
    torchrun --nproc-per-node 8 run_ablation.py --config configs/ablations/hicache_flux_dev.yaml
    python run_ablation.py --config CFG --shard 3/16     # one Slurm array task (SLURM_ARRAY_TASK_ID/16)
    python run_ablation.py --config CFG --merge          # after all shards: merge, metrics, reports
    python run_ablation.py --download-metric-weights DIR # on a machine with internet

Rerunning the same command after a kill resumes: finished images and metrics are kept, the rest is
done. Under torchrun, or with --shard, every worker must see the same output_dir (a shared filesystem
across nodes): rank 0, or --merge, reads every shard's records and images from it. Shards may run at
the same time into one output_dir; one shard runs in one process at a time (a lock refuses a second).
"""

import time

START = time.perf_counter()  # the sweep's wall time includes imports

import argparse  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import NoReturn  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

from utils import sweep  # noqa: E402
from utils.benchmark_utils import ArgumentParser, command_line, int_at_least  # noqa: E402


def create_ablation_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="configs/ablations/NAME.yaml")
    parser.add_argument("--output_dir", default=None, help="instead of the config's output_dir")
    parser.add_argument("--base", action="append", default=[], metavar="FLAG=VALUE",
                        help="override one base flag of the config, e.g. --base num_inference_steps=8 (repeatable)")
    parser.add_argument("--variants", default=None, metavar="A,B,...",
                        help="only these variants of the config (the baseline is always kept)")
    parser.add_argument("--prompts", default=None, metavar="SPEC",
                        help="instead of the config's prompt set: default, a file (DrawBench .csv, PartiPrompts .tsv, "
                             "COCO captions .json, text .txt) or FORMAT:PATH (formats: drawbench, parti, coco, text, "
                             "edits)")
    parser.add_argument("--limit_prompts", type=int_at_least(1), default=None,
                        help="only N prompts of the set (a fixed sample, in the set's order)")
    parser.add_argument("--seeds_per_prompt", type=int_at_least(1), default=None, help="instead of the config's")
    parser.add_argument("--warmup_runs", type=int_at_least(0), default=None, help="instead of the config's warmup_runs")
    parser.add_argument("--shard", default=None, metavar="I/N", help="generate shard I of N (0-based) and stop; "
                        "run --merge when every shard is done")
    parser.add_argument("--merge", action="store_true", help="no generation: merge the shards' records, compute "
                        "metrics and write the reports")
    parser.add_argument("--no_metrics", action="store_true", help="skip quality metrics (tables keep speed columns)")
    parser.add_argument("--metrics_weights_dir", default=None, help="instead of the config's metrics_weights_dir")
    parser.add_argument("--metrics_random_init", action="store_true",
                        help="random-init metric models (no weights needed; values are meaningless)")
    parser.add_argument("--clip_model", choices=("ViT-L-14", "ViT-g-14"), default=None,
                        help="the CLIP score's model, instead of the config's clip_model (default ViT-L-14); with "
                             "--download-metric-weights, also fetch it")
    parser.add_argument("--download-metric-weights", dest="download_metric_weights", metavar="DIR", default=None,
                        help="fetch every metric model's weights into DIR and exit (needs internet)")
    parser.add_argument("--dry_run", action="store_true", help="validate the config, print the work list and exit")
    return parser


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun, else (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    # Ranks only meet at the end of generation; a long timeout lets the slowest finish its share.
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size(), local


def print_plan(config: sweep.SweepConfig, num_prompts: int) -> None:
    print(f"[sweep] {config.name}: {len(config.variants)} variants x {num_prompts} prompts x {len(config.seeds)} "
          f"seeds = {len(config.variants) * num_prompts * len(config.seeds)} images -> {config.output_dir}")
    for v in config.variants:
        mark = " (baseline)" if v.name == config.baseline else ""
        print(f"  {v.name}{mark}: {' '.join(v.argv)}")
        if v.stack_error:
            print(f"    will be recorded as FAILED on this machine: {v.stack_error}")


FOLDER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)  # the folder stopped taking files


def fail(message: str) -> NoReturn:
    """A config or input the sweep cannot run with: one line, exit status 2."""
    print(f"run_ablation.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = create_ablation_parser()
    opts = parser.parse_args(argv)
    if opts.download_metric_weights:
        from utils.metrics import download_metric_weights

        if opts.clip_model in (None, "ViT-L-14"):
            download_metric_weights(opts.download_metric_weights)
        else:
            download_metric_weights(opts.download_metric_weights, clip_models=("ViT-L-14", opts.clip_model))
        print(f"metric weights are in {opts.download_metric_weights}; pass --metrics_weights_dir "
              f"{opts.download_metric_weights} (or set metrics_weights_dir in the config)")
        return 0
    if not opts.config:
        parser.error("--config is required (or --download-metric-weights DIR)")
    if opts.shard and opts.merge:
        parser.error("--shard generates, --merge reports: run them as separate commands")
    # Everything that the config and the flags alone can tell is checked before diffusers and the stack are
    # imported (check_on_this_machine, below, imports them).
    try:
        config = sweep.load_config(opts.config, base_overrides=opts.base, output_dir=opts.output_dir,
                                   prompt_limit=opts.limit_prompts, seeds_per_prompt=opts.seeds_per_prompt,
                                   only_variants=opts.variants.split(",") if opts.variants else None,
                                   check_machine=False)
        config.metrics_random_init = config.metrics_random_init or opts.metrics_random_init
        if opts.clip_model is not None:
            config.clip_model = opts.clip_model
        if opts.warmup_runs is not None:
            config.warmup_runs = opts.warmup_runs
        if opts.prompts is not None:
            config.prompt_spec = opts.prompts
            config.raw["prompts"] = {"spec": opts.prompts, "limit": config.prompt_limit}
        prompts = sweep.load_sweep_prompts(config)
        shard = sweep.parse_shard(opts.shard) if opts.shard else (0, 1)
    except (sweep.ConfigError, ValueError) as e:
        fail(str(e))

    weights_dir = opts.metrics_weights_dir or config.metrics_weights_dir
    from utils.metric_models import BUILDERS  # the metrics with a model (PSNR and SSIM need none)

    needs_weights = [m for m in config.metrics if m in BUILDERS]
    if needs_weights and not (opts.no_metrics or opts.shard or config.metrics_random_init):
        # Fail now, not after hours of generation (utils/metric_models.py checks each file at load time).
        if not weights_dir:
            fail(f"metrics {', '.join(needs_weights)} need weights: pass --metrics_weights_dir DIR (fill it with "
                 f"`python run_ablation.py --download-metric-weights DIR` on a machine with internet), or "
                 f"--metrics_random_init for a smoke run, or --no_metrics")
        if not os.path.isdir(weights_dir):
            fail(f"--metrics_weights_dir {weights_dir}: no such folder (fill it with `python run_ablation.py "
                 f"--download-metric-weights {weights_dir}` on a machine with internet)")

    rank, world, local_rank = distributed_rank()
    if world > 1:
        if opts.shard:
            parser.error("--shard and torchrun both split the work: use one of them")
        shard = (rank, world)
    locks = []
    try:
        if not opts.dry_run:
            try:
                args = sweep.parse_variant_args(config.base_argv, "base")
                todo = len(sweep.work_list(config, len(prompts), shard)) if not opts.merge else 0
                warning = sweep.check_output_dir(config.output_dir, todo * sweep.raw_image_bytes(args))
                if warning:
                    print(f"[sweep] warning: {warning}", file=sys.stderr)
                locks.append(sweep.hold_lock(config.output_dir, "merge" if opts.merge else
                                             f"shard-{shard[0]}-of-{shard[1]}"))
            except sweep.ConfigError as e:
                fail(str(e))
        try:
            sweep.check_on_this_machine(config)
        except sweep.ConfigError as e:
            fail(str(e))
        if rank == 0:
            print_plan(config, len(prompts))
        if opts.dry_run:
            return 0
        return run(opts, argv, config, prompts, shard, rank, world, local_rank, weights_dir, locks)
    finally:
        for lock in locks:
            lock.close()


def run(opts, argv, config: sweep.SweepConfig, prompts, shard, rank, world, local_rank, weights_dir, locks) -> int:
    """Generation, then (unless --shard) merge, metrics, the interval=1 check and the reports."""
    if rank == 0 and shard[0] == 0:
        command = command_line(argv, "run_ablation.py")
        resolved = {**config.raw, "output_dir": str(config.output_dir), "command": command}
        sweep.write_text_atomic(config.output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    device = f"cuda:{local_rank}" if torch.cuda.is_available() else None
    generation = sweep.GenerationTiming()
    try:
        if not opts.merge:
            generation = sweep.run_generation(config, prompts, shard, device=device, show_progress=rank == 0)
    except sweep.ConfigError as e:  # records of other flags for a variant in this output_dir
        fail(str(e))
    except OSError as e:  # OutputWriteError, or a folder that broke since the start
        return stopped_writing(e)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank != 0:
            dist.destroy_process_group()
            return 0
    if opts.shard:
        print(f"[sweep] shard {opts.shard} done ({generation.images} images in {generation.wall_s:.1f} s); when "
              f"every shard is done: python run_ablation.py --config {opts.config} --merge")
        return 0

    try:
        if not opts.merge:  # --merge took it at the start
            locks.append(sweep.hold_lock(config.output_dir, "merge"))
        return report(opts, config, prompts, generation, world, weights_dir, device)
    except sweep.ConfigError as e:
        fail(str(e))
    except OSError as e:
        return stopped_writing(e)


def stopped_writing(error: OSError) -> int:
    """The output folder stopped taking files (disk full, read-only): one line, exit status 1. Any other OSError
    is raised as it is."""
    if not isinstance(error, sweep.OutputWriteError) and error.errno not in FOLDER_ERRNOS:
        raise error
    print(f"run_ablation.py: error: {error}; what was written is kept: fix the folder (free space, permissions) and "
          f"rerun the same command to resume", file=sys.stderr)
    return 1


def report(opts, config: sweep.SweepConfig, prompts, generation: sweep.GenerationTiming, world: int, weights_dir,
           device) -> int:
    """Merge, metrics, the interval=1 check and the reports (rank 0, or --merge)."""
    merged = sweep.merge_records(config, prompts)
    metrics_started = time.perf_counter()
    per_image, per_set = {}, {}
    if config.metrics and not opts.no_metrics:
        per_image, per_set = sweep.compute_sweep_metrics(config, merged, device or "cpu", weights_dir,
                                                         show_progress=True)
    metrics_s = time.perf_counter() - metrics_started

    interval1 = None
    if config.interval1_check is not None:
        interval1 = sweep.run_interval1_check(config.interval1_check, config.base_argv)

    from utils import reports

    wall_s = time.perf_counter() - START
    latency_sum = generation.sum_latency_s or None
    timing = {  # this process's run; under torchrun rank 0's own share
        "wall_s": wall_s,
        "generation_s": generation.wall_s,
        "setup_s (load, compile, warm-up)": generation.setup_s,
        "metrics_s": metrics_s,
        "images generated now": generation.images,
        "sum_image_latency_s": generation.sum_latency_s,
        "wall / sum of latencies": wall_s / latency_sum if latency_sum else None,
        # per-image overhead of the loop itself (records, PNGs, progress), without setup, imports, metrics
        "(generation - setup) / sum of latencies": ((generation.wall_s - generation.setup_s) / latency_sum
                                                    if latency_sum else None),
    }
    if world > 1:
        timing["ranks"] = world
    written = reports.write_report(
        config.output_dir, config.name, config.description, merged.records, [v.name for v in config.variants],
        config.baseline, merged.status, config.metrics if not opts.no_metrics else [], per_image, per_set,
        pareto_metrics=None if opts.no_metrics else config.report.get("pareto_metrics"),
        grid_rows=config.report.get("grid_prompts", 3), timing=timing, interval1=interval1,
        metrics_random_init=config.metrics_random_init, show_progress=True, clip_model=config.clip_model)
    timing["wall_s_with_report"] = time.perf_counter() - START
    sweep.write_text_atomic(config.output_dir / "timing.json", json.dumps(timing, indent=2))

    print((config.output_dir / "summary.md").read_text().split("\n## Plots")[0])
    print(f"[sweep] wrote {', '.join(sorted(p.name for p in written.values()))} in {config.output_dir}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if interval1 is not None and interval1.get("status") != "PASS":
        print(f"[sweep] interval=1 three-way check: {interval1.get('status')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

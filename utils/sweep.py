"""An ablation sweep: config schema and validation, the work list, the generation loop, JSONL records,
resume, sharding and merge. `run_ablation.py` is the command; `utils/reports.py` turns the records
into tables and plots.

Layout of `<output_dir>/`:
    config.yaml                      the config as resolved (base overrides applied), for the record
    <variant>/p0003_s1.png           one image per (variant, prompt index, seed)
    records/shard-<i>-of-<n>.jsonl   one JSON line per image (or per failure), appended + fsync'd
    records.jsonl                    all shards merged (written by the merge step)
    metrics.jsonl, metrics_sets.json per-image and set-level quality metrics
    summary.{csv,md,tex}, *.png, *.pdf

Weight reuse rule: the optimization stack only touches `pipeline.transformer` (and inductor's global
config, which is restored before every variant). A loaded pipeline is reused by the next variant
when both have the same `(ckpt, dtype, device)` and the previous variant's stack report shows no
transformer-mutating layer (QKV fusion, FA3 processors, Chipmunk, feature caching, float8 quant,
compile/export) as applied; otherwise it is dropped and reloaded, and dynamo's caches are reset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import gc
import json
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from utils.benchmark_utils import (STAGE_TIMER, annotate_pipeline, create_parser, environment_record,
                                   pipeline_call_kwargs, resolved_defaults, stack_flags)

CONFIG_KEYS = {
    "name": "a label for the report (default: the config file's stem)",
    "description": "free text, copied into summary.md",
    "output_dir": "where images, records and reports go",
    "base": "flags shared by every variant (create_parser() names: ckpt, num_inference_steps, disable_fa3, ...)",
    "baseline": "the variant that speedups and reference metrics are measured against",
    "variants": "list of {name, flags, description}",
    "prompts": "{spec: default | PATH | FORMAT:PATH, limit: N} or just the spec string",
    "seeds_per_prompt": "images per prompt (seeds seed, seed+1, ...)",
    "seed": "the first seed (default 0)",
    "warmup_runs": "untimed generations per variant before timing (default 1)",
    "metrics": "subset of utils.metrics.METRIC_NAMES",
    "metrics_random_init": "build metric models with random weights (smoke tests only)",
    "metrics_weights_dir": "folder filled by `run_ablation.py --download-metric-weights DIR`",
    "metrics_batch_size": "images per metric batch (default 16)",
    "fid_reference_dir": "a folder of real images (e.g. COCO val) for a second FID per variant",
    "report": "{pareto_metrics: [...], grid_prompts: N}",
    "interval1_check": "run the Chipmunk interval=1 three-way check and report PASS/FAIL",
}
VARIANT_KEYS = ("name", "flags", "description")
PROMPT_KEYS = ("spec", "limit")
REPORT_KEYS = ("pareto_metrics", "grid_prompts")
# The sweep sets these per image or not at all.
SWEEP_OWNED_FLAGS = {"prompt": "prompts come from `prompts:`", "seed": "seeds come from `seed:` and `seeds_per_prompt:`",
                     "output_file": "images go under output_dir", "image": "Kontext editing sweeps are not supported",
                     "num_runs": "every (prompt, seed) is timed once", "warmup_runs": "use the top-level `warmup_runs:`",
                     "results_dir": "records go under output_dir", "trace_file": "use run_benchmark.py for traces",
                     "check": "use the config's interval1_check: section",
                     "check_tolerance": "use interval1_check: {tolerance: ...}"}
# Layers of optimize() that change the transformer module in place (see the module docstring).
MUTATING_LAYERS = ("qkv_fusion", "attention", "chipmunk", "feature_cache", "float8_quant", "compile_export")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.=+-]+$")


class ConfigError(ValueError):
    """A config that cannot run: reported before any image is generated."""


# --- config ----------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    argv: list[str]  # the variant's full command line for create_parser(): base flags, then its overrides
    description: str = ""
    stack_error: str | None = None  # validate_args' refusal on this machine: the variant is recorded as failed


@dataclass
class SweepConfig:
    name: str
    path: str
    output_dir: Path
    baseline: str
    variants: list[Variant]
    base_argv: list[str]
    prompt_spec: str
    prompt_limit: int | None
    seeds: list[int]
    warmup_runs: int
    metrics: list[str]
    metrics_random_init: bool
    metrics_weights_dir: str | None
    metrics_batch_size: int
    fid_reference_dir: str | None
    report: dict[str, Any]
    interval1_check: dict[str, Any] | None
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def _check_keys(section: dict, allowed: Iterable[str], where: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(section).__name__}")
    allowed = list(allowed)
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _flag_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in create_parser()._actions if a.dest != "help"}


def flags_to_argv(flags: dict[str, Any], where: str) -> list[str]:
    """`{cache_mode: taylor, disable_fa3: true}` -> `["--cache_mode", "taylor", "--disable_fa3"]`.

    Keys are create_parser() names, with `_` or `-`; a boolean flag set to false is left out, and so is
    a value of null (the flag's default)."""
    if flags is None:
        return []
    if not isinstance(flags, dict):
        raise ConfigError(f"{where} must be a mapping of flag: value, got {type(flags).__name__}")
    actions = _flag_actions()
    argv: list[str] = []
    for key, value in flags.items():
        dest = str(key).replace("-", "_")
        if dest in SWEEP_OWNED_FLAGS:
            raise ConfigError(f"{where}: flag {key!r} is set by the sweep ({SWEEP_OWNED_FLAGS[dest]})")
        action = actions.get(dest)
        if action is None:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown flag {key!r}{hint}; flags are those of `python run_benchmark.py --help`")
        option = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: flag {key!r} is a switch, give true or false (got {value!r})")
            if value:
                argv.append(option)
        elif value is not None:
            argv += [option, str(value)]
    return argv


def parse_variant_args(argv: list[str], where: str) -> argparse.Namespace:
    """create_parser() + resolved_defaults(), raising ConfigError (not SystemExit) on a bad value."""
    parser = create_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(f"{where}: {e}") from None
    return resolved_defaults(args)


def load_config(path: str | Path, base_overrides: list[str] | None = None, output_dir: str | None = None,
                prompt_limit: int | None = None, seeds_per_prompt: int | None = None,
                only_variants: list[str] | None = None) -> SweepConfig:
    """Read and validate a sweep config; every variant's flags are parsed and checked with validate_args.

    `base_overrides` are `FLAG=VALUE` strings from the command line, applied to `base:` (for example
    fewer steps on a quick run). A StackError on this machine (say, a CUDA-only layer on a CPU host)
    does not stop the sweep: that variant is recorded as failed with the error."""
    from utils.pipeline_utils import StackError, validate_args

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    _check_keys(raw, CONFIG_KEYS, str(path))
    for key in ("output_dir", "variants", "baseline"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key {key!r} ({CONFIG_KEYS[key]})")

    base = dict(raw.get("base") or {})
    for item in base_overrides or []:
        if "=" not in item:
            raise ConfigError(f"--base {item!r}: use FLAG=VALUE")
        key, value = item.split("=", 1)
        base[key] = yaml.safe_load(value)  # "8" -> 8, "true" -> True, "null" -> None
    base_argv = flags_to_argv(base, f"{path}: base")

    if not isinstance(raw["variants"], list) or not raw["variants"]:
        raise ConfigError(f"{path}: variants must be a non-empty list of {{name, flags}}")
    variants: list[Variant] = []
    for i, entry in enumerate(raw["variants"]):
        _check_keys(entry, VARIANT_KEYS, f"{path}: variants[{i}]")
        name = entry.get("name")
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise ConfigError(f"{path}: variants[{i}] needs a name of letters, digits and _.=+- (got {name!r})")
        if any(v.name == name for v in variants):
            raise ConfigError(f"{path}: variant name {name!r} appears twice")
        where = f"{path}: variant {name!r}"
        merged = {**base, **(entry.get("flags") or {})}
        argv = flags_to_argv(merged, where)
        args = parse_variant_args(argv, where)
        variant = Variant(name=name, argv=argv, description=str(entry.get("description") or ""))
        try:
            validate_args(args)
        except StackError as e:
            variant.stack_error = str(e)
        variants.append(variant)

    baseline = raw["baseline"]
    if baseline not in [v.name for v in variants]:
        names = ", ".join(v.name for v in variants)
        raise ConfigError(f"{path}: baseline {baseline!r} is not one of the variants ({names})")
    if only_variants:
        unknown = [n for n in only_variants if n not in [v.name for v in variants]]
        if unknown:
            raise ConfigError(f"--variants: {', '.join(unknown)} not in {path} ({', '.join(v.name for v in variants)})")
        variants = [v for v in variants if v.name in only_variants or v.name == baseline]

    prompts = raw.get("prompts", "default")
    if isinstance(prompts, str):
        prompts = {"spec": prompts}
    _check_keys(prompts, PROMPT_KEYS, f"{path}: prompts")
    limit = prompt_limit if prompt_limit is not None else prompts.get("limit")

    n_seeds = seeds_per_prompt if seeds_per_prompt is not None else raw.get("seeds_per_prompt", 1)
    first_seed = raw.get("seed", 0)
    for key, value, minimum in (("seeds_per_prompt", n_seeds, 1), ("seed", first_seed, 0),
                                ("warmup_runs", raw.get("warmup_runs", 1), 0),
                                ("metrics_batch_size", raw.get("metrics_batch_size", 16), 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{path}: {key} must be an integer >= {minimum} (got {value!r})")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{path}: prompts.limit must be an integer >= 1 (got {limit!r})")

    metrics = list(raw.get("metrics") or [])
    from utils.metrics import METRIC_NAMES as known_metrics

    for m in metrics:
        if m not in known_metrics:
            raise ConfigError(f"{path}: unknown metric {m!r} (choose from {', '.join(known_metrics)})")

    report = dict(raw.get("report") or {})
    _check_keys(report, REPORT_KEYS, f"{path}: report")
    for m in report.get("pareto_metrics") or []:
        if m not in metrics or m not in known_metrics:
            raise ConfigError(f"{path}: report.pareto_metrics: {m!r} is not among the config's metrics")
    interval1 = raw.get("interval1_check")
    if interval1 is not None:
        _check_keys(interval1, INTERVAL1_KEYS, f"{path}: interval1_check")
        flags_to_argv(interval1.get("flags") or {}, f"{path}: interval1_check.flags")

    return SweepConfig(
        name=str(raw.get("name") or path.stem), path=str(path), description=str(raw.get("description") or ""),
        output_dir=Path(output_dir or raw["output_dir"]), baseline=baseline, variants=variants,
        base_argv=base_argv, prompt_spec=str(prompts.get("spec", "default")), prompt_limit=limit,
        seeds=list(range(first_seed, first_seed + n_seeds)), warmup_runs=raw.get("warmup_runs", 1),
        metrics=metrics, metrics_random_init=bool(raw.get("metrics_random_init", False)),
        metrics_weights_dir=raw.get("metrics_weights_dir"), metrics_batch_size=raw.get("metrics_batch_size", 16),
        fid_reference_dir=raw.get("fid_reference_dir"),
        report=report, interval1_check=interval1, raw={**raw, "base": base})


def load_sweep_prompts(config: SweepConfig) -> list[dict[str, Any]]:
    from utils.prompts import load_prompts

    prompts = load_prompts(config.prompt_spec, limit=config.prompt_limit)
    if not prompts:
        raise ConfigError(f"{config.path}: the prompt set {config.prompt_spec!r} is empty")
    return prompts


# --- work list and sharding ------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkItem:
    variant: str
    prompt_index: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant}/p{self.prompt_index:04d}_s{self.seed}"

    @property
    def image(self) -> str:
        """Relative to output_dir."""
        return self.key + ".png"


def parse_shard(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4); shards are numbered from 0, as Slurm's SLURM_ARRAY_TASK_ID usually is."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"--shard wants i/n with 0 <= i < n (got {text!r})")
    return int(match[1]), int(match[2])


def work_list(config: SweepConfig, num_prompts: int, shard: tuple[int, int] = (0, 1)) -> list[WorkItem]:
    """Variant-major (one pipeline load per variant); a shard takes every n-th (prompt, seed) pair, the
    same pairs for every variant, so a shard's images can be compared with its own baseline images."""
    index, count = shard
    pairs = [(p, s) for p in range(num_prompts) for s in config.seeds][index::count]
    return [WorkItem(v.name, p, s) for v in config.variants for p, s in pairs]


# --- records ---------------------------------------------------------------------------------------

def records_path(output_dir: Path, shard: tuple[int, int]) -> Path:
    return Path(output_dir) / "records" / f"shard-{shard[0]}-of-{shard[1]}.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete record; a torn last line (a kill during the write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only the torn tail can fail: repair_jsonl() cuts it before anything is appended
    return records


def repair_jsonl(path: Path) -> None:
    """Cut a torn last line, so that the next append starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_all_records(output_dir: Path) -> list[dict[str, Any]]:
    """Records of every shard ever run into output_dir, in file then line order."""
    records = []
    for path in sorted((Path(output_dir) / "records").glob("*.jsonl")):
        records += read_jsonl(path)
    return records


def latest_ok_records(records: list[dict[str, Any]], output_dir: Path) -> dict[str, dict[str, Any]]:
    """key -> the last 'ok' record whose image is on disk."""
    done = {}
    for rec in records:
        if rec.get("status") == "ok" and (Path(output_dir) / rec["image"]).exists():
            done[rec["key"]] = rec
    return done


class RecordWriter:
    """Saves images atomically and appends records durably, on one background thread so that PNG
    encoding and fsync overlap the next generation. The record is written after its image is in place,
    so a record always has its image."""

    def __init__(self, output_dir: Path, shard: tuple[int, int]):
        self.output_dir = Path(output_dir)
        self.path = records_path(output_dir, shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl(self.path)
        self.file = self.path.open("a")
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="record-writer")
        self.pending: list[concurrent.futures.Future] = []

    def append(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, default=str) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def _save(self, image, record: dict[str, Any]) -> None:
        path = self.output_dir / record["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            image.save(f, format="PNG", compress_level=1)  # fast: PNG compression is not what we time
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.append(record)

    def submit(self, image, record: dict[str, Any]) -> None:
        self.pending.append(self.pool.submit(self._save, image, record))
        finished = [f for f in self.pending if f.done()]
        self.pending = [f for f in self.pending if f not in finished]
        for f in finished:
            f.result()  # surface a failed write now, not at the end of the sweep

    def submit_record(self, record: dict[str, Any]) -> None:
        self.pending.append(self.pool.submit(self.append, record))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for f in self.pending:
            f.result()  # re-raise a failed write
        self.file.close()


# --- generation ------------------------------------------------------------------------------------

@dataclass
class LoadedPipeline:
    pipeline: Any = None
    load_key: tuple | None = None
    pristine: bool = False
    compiled: bool = False
    dense_flops: dict = field(default_factory=dict)  # (ckpt, h, w, text len) -> FLOPs of one dense forward


def release(loaded: LoadedPipeline) -> None:
    loaded.pipeline, loaded.load_key, loaded.pristine = None, None, False
    if loaded.compiled:
        torch._dynamo.reset()  # compiled code is guarded on the dropped modules; start clean
        loaded.compiled = False
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_pipeline(loaded: LoadedPipeline, args: argparse.Namespace) -> Any:
    """Reuse the loaded pipeline when the rule in the module docstring allows, else load a fresh one."""
    from utils.pipeline_utils import load_pipeline

    load_key = (args.ckpt, args.disable_bf16, args.device)
    if loaded.pipeline is not None and loaded.load_key == load_key and loaded.pristine:
        print(f"[sweep] reusing the loaded {args.ckpt} pipeline (previous variant left the transformer untouched)")
        return loaded.pipeline
    release(loaded)
    loaded.pipeline, loaded.load_key = load_pipeline(args), load_key
    return loaded.pipeline


def dense_flops_per_forward(loaded: LoadedPipeline, pipeline, args: argparse.Namespace) -> int:
    """FLOPs of one eager, unoptimized transformer forward, counted once per checkpoint and shape."""
    key = (args.ckpt, args.height, args.width, args.max_sequence_length)
    if key not in loaded.dense_flops:
        from run_benchmark import transformer_flops

        loaded.dense_flops[key] = transformer_flops(pipeline, args)
    return loaded.dense_flops[key]


def cache_counts(pipeline, args: argparse.Namespace, dense_forward_flops: int) -> dict[str, Any]:
    """Full/forecast steps and FLOPs of the last generation, from the caching layer when it is on."""
    steps = args.num_inference_steps
    dense = dense_forward_flops * steps
    cache = getattr(pipeline.transformer, "harness_cache", None)
    if cache is None:
        return {"full_steps": steps, "forecast_steps": 0, "flops": dense, "flops_dense": dense, "flops_speedup": 1.0,
                "cache_stats": None}
    stats = cache.stats()
    # flops_speedup is the cache's dense/actual ratio; applied to our dense count, it keeps every
    # variant's FLOPs on the same scale as the baseline's. cache-dit gives no FLOPs: left unknown.
    speedup = stats.get("flops_speedup")
    return {"full_steps": stats.get("full_steps", steps), "forecast_steps": stats.get("forecast_steps", 0),
            "flops": dense / speedup if speedup else None, "flops_dense": dense, "flops_speedup": speedup,
            "cache_stats": stats}


def generate_image(pipeline, args: argparse.Namespace, prompt: str, seed: int):
    # torch.manual_seed(seed) as in gen_image.py, so that a record's `reproduce` command gives its image.
    kwargs = {**pipeline_call_kwargs(args), "prompt": prompt}
    return pipeline(**kwargs, generator=torch.manual_seed(seed), output_type="pil").images[0]


def reproduce_command(variant: Variant, prompt: str, seed: int) -> str:
    import shlex

    return " ".join(["python gen_image.py", *map(shlex.quote, variant.argv), "--prompt", shlex.quote(prompt),
                     "--seed", str(seed), "--output-file", "reproduced.png"])


@dataclass
class GenerationTiming:
    wall_s: float = 0.0
    setup_s: float = 0.0  # load, FLOP count, optimize (compile) and warm-up
    images: int = 0
    sum_latency_s: float = 0.0


def run_generation(config: SweepConfig, prompts: list[dict[str, Any]], shard: tuple[int, int],
                   device: str | None = None, show_progress: bool = True) -> GenerationTiming:
    """Generate this shard's missing images; a failing variant is recorded as failed and skipped."""
    from utils.pipeline_utils import validate_args

    started = time.perf_counter()
    timing = GenerationTiming()
    output_dir = config.output_dir
    items = work_list(config, len(prompts), shard)
    existing = read_all_records(output_dir)
    check_flags_unchanged(config, existing)
    done = latest_ok_records(existing, output_dir)
    todo = [it for it in items if it.key not in done]
    print(f"[sweep] shard {shard[0]}/{shard[1]}: {len(items)} images, {len(items) - len(todo)} already done, "
          f"{len(todo)} to generate")

    from tqdm import tqdm

    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"sweep {config.name}", unit="img",
               disable=not show_progress)
    writer = RecordWriter(output_dir, shard)
    loaded = LoadedPipeline()
    inductor_defaults = torch._inductor.config.get_config_copy()
    try:
        for variant in config.variants:
            variant_todo = [it for it in todo if it.variant == variant.name]
            if not variant_todo:
                continue
            bar.set_postfix_str(variant.name)
            setup_started = time.perf_counter()
            generated, pipeline = 0, None
            try:
                args = parse_variant_args(variant.argv, variant.name)
                if device is not None and args.device.startswith("cuda"):
                    args.device = device  # torchrun: this rank's GPU
                validate_args(args)  # re-raises the StackError found at load time, if any
                torch._inductor.config.load_config(inductor_defaults)  # undo a previous variant's flags
                pipeline = prepare_pipeline(loaded, args)
                flops_fwd = dense_flops_per_forward(loaded, pipeline, args)
                print(f"[sweep] variant {variant.name}: {' '.join(variant.argv)}")
                from utils.pipeline_utils import optimize

                optimize(pipeline, args)
                loaded.pristine = all(not status.startswith("applied") for layer, status in
                                      pipeline.harness_stack.items() if layer in MUTATING_LAYERS)
                loaded.compiled = loaded.compiled or args.compile_export_mode != "disabled"
                env = environment_record(args.device)
                cuda = args.device.startswith("cuda")
                with annotate_pipeline(pipeline):
                    first = prompts[variant_todo[0].prompt_index]["prompt"]
                    for _ in range(config.warmup_runs):
                        generate_image(pipeline, args, first, variant_todo[0].seed)
                    timing.setup_s += time.perf_counter() - setup_started
                    for item in variant_todo:
                        record = time_one_image(pipeline, args, variant, item, prompts[item.prompt_index], flops_fwd,
                                                cuda, env, shard)
                        writer.submit(record.pop("_image"), record)
                        timing.images += 1
                        timing.sum_latency_s += record["latency_s"]
                        generated += 1
                        bar.update(1)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - OOM, StackError, a missing package (the core
                # exits with a message then): record it and go on
                message = f"{type(e).__name__}: {e}"
                print(f"[sweep] variant {variant.name} FAILED: {message}")
                writer.submit_record({"key": f"{variant.name}/failed", "status": "failed", "variant": variant.name,
                                      "error": message, "traceback": traceback.format_exc()[-4000:],
                                      "argv": variant.argv, "shard": f"{shard[0]}/{shard[1]}",
                                      "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                e.__traceback__ = None  # let go of the frames that hold GPU tensors
                pipeline = None
                release(loaded)  # the failure may have left the transformer half-optimized
                bar.update(len(variant_todo) - generated)
            finally:
                STAGE_TIMER.enabled = False
                pipeline = None  # only `loaded` may keep it: a reload must not hold two copies in GPU memory
    finally:
        writer.close()
        bar.close()
        release(loaded)
        torch._inductor.config.load_config(inductor_defaults)
    timing.wall_s = time.perf_counter() - started
    return timing


def time_one_image(pipeline, args, variant: Variant, item: WorkItem, prompt: dict[str, Any], flops_fwd: int,
                   cuda: bool, env: dict[str, Any], shard: tuple[int, int]) -> dict[str, Any]:
    from utils.benchmark_utils import time_call

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    STAGE_TIMER.enabled = True
    STAGE_TIMER.collect()  # drop warm-up events
    latency, image = time_call(lambda: generate_image(pipeline, args, prompt["prompt"], item.seed), args.device)
    stages = {label: sum(values) for label, values in STAGE_TIMER.collect().items()}
    STAGE_TIMER.enabled = False
    counts = cache_counts(pipeline, args, flops_fwd)
    return {
        "key": item.key, "status": "ok", "variant": variant.name, "prompt_index": item.prompt_index,
        "prompt": prompt["prompt"], "category": prompt.get("category"), "source": prompt.get("source"),
        "seed": item.seed, "image": item.image,
        "latency_s": latency,
        "denoise_s": stages.get("denoising_step"),  # the transformer calls of the denoising loop
        "stages_s": {"prompt_encoding": stages.get("prompt_encoding"), "denoising": stages.get("denoising_step"),
                     "decoding": stages.get("decoding"), "postprocessing": stages.get("postprocessing")},
        **counts,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "ckpt": args.ckpt, "height": args.height, "width": args.width, "steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale, "max_sequence_length": args.max_sequence_length,
        "flags": stack_flags(args), "argv": variant.argv, "stack": pipeline.harness_stack,
        "random_weights": getattr(pipeline, "harness_random_weights", None),
        "environment": env, "shard": f"{shard[0]}/{shard[1]}",
        "reproduce": reproduce_command(variant, prompt["prompt"], item.seed),
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "_image": image,
    }


def check_flags_unchanged(config: SweepConfig, records: list[dict[str, Any]]) -> None:
    """Resuming with different flags for a variant would mix two configurations under one name."""
    for rec in records:
        if rec.get("status") != "ok" or rec["variant"] not in {v.name for v in config.variants}:
            continue
        current = config.variant(rec["variant"]).argv
        if rec["argv"] != current:
            raise ConfigError(f"variant {rec['variant']!r} was generated in {config.output_dir} with flags "
                              f"{' '.join(rec['argv'])!r}, the config now says {' '.join(current)!r}: use another "
                              f"output_dir, or delete {config.output_dir / rec['variant']} and its records")


# --- merge -----------------------------------------------------------------------------------------

@dataclass
class MergedSweep:
    records: list[dict[str, Any]]  # ok records of the configured variants, one per key, in work-list order
    status: dict[str, str]  # variant -> "ok" | "failed: ..." | "incomplete (k/n)"
    missing: dict[str, int]


def merge_records(config: SweepConfig, prompts: list[dict[str, Any]]) -> MergedSweep:
    """Gather every shard's records into records.jsonl (atomically) and say which variants are complete."""
    output_dir = config.output_dir
    everything = read_all_records(output_dir)
    done = latest_ok_records(everything, output_dir)
    failures = {rec["variant"]: rec for rec in everything if rec.get("status") == "failed"}
    items = work_list(config, len(prompts))
    merged = [done[it.key] for it in items if it.key in done]
    status, missing = {}, {}
    for variant in config.variants:
        expected = [it for it in items if it.variant == variant.name]
        have = sum(1 for it in expected if it.key in done)
        missing[variant.name] = len(expected) - have
        if have == len(expected):
            status[variant.name] = "ok"
        elif variant.name in failures:
            status[variant.name] = "failed: " + failures[variant.name]["error"].splitlines()[0][:300]
        else:
            status[variant.name] = f"incomplete ({have}/{len(expected)})"
    write_text_atomic(output_dir / "records.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in merged))
    return MergedSweep(records=merged, status=status, missing=missing)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- metrics ---------------------------------------------------------------------------------------

def compute_sweep_metrics(config: SweepConfig, merged: MergedSweep, device: str,
                          weights_dir: str | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per-image metrics (key -> {metric: value}) and set-level metrics (variant -> {...}).

    Reference metrics compare each image with the baseline image of the same prompt and seed (pairs
    where both exist); the baseline itself gets the prompt metrics only (refs=None), its reference
    metrics being trivially ideal. Written to metrics.jsonl and metrics_sets.json."""
    if not config.metrics:
        return {}, {}
    from utils.metrics import compute_metrics, load_image_files, load_metric_models

    models = load_metric_models(config.metrics, weights_dir or config.metrics_weights_dir,
                                random_init=config.metrics_random_init, device=device,
                                fid_reference_dir=config.fid_reference_dir)
    by_variant: dict[str, dict[tuple, dict]] = {}
    for rec in merged.records:
        by_variant.setdefault(rec["variant"], {})[(rec["prompt_index"], rec["seed"])] = rec
    baseline = by_variant.get(config.baseline, {})
    workers = min(16, os.cpu_count() or 1)
    baseline_images = {}  # (prompt_index, seed) -> uint8 image: decoded once, the reference of every variant
    if baseline:
        pairs = sorted(baseline)
        decoded = load_image_files([config.output_dir / baseline[p]["image"] for p in pairs], workers)
        baseline_images = dict(zip(pairs, decoded))

    per_image, per_set = {}, {}
    for variant in config.variants:
        recs = by_variant.get(variant.name, {})
        is_baseline = variant.name == config.baseline
        pairs = sorted(recs) if is_baseline else sorted(set(recs) & set(baseline))
        if not pairs:
            continue
        if is_baseline:
            images, refs = torch.stack([baseline_images[p] for p in pairs]), None
        else:
            images = load_image_files([config.output_dir / recs[p]["image"] for p in pairs], workers)
            refs = torch.stack([baseline_images[p] for p in pairs])
        texts = [recs[p]["prompt"] for p in pairs]
        rows, set_level = compute_metrics(config.metrics, images, refs, texts, models,
                                          batch_size=config.metrics_batch_size)
        for p, row in zip(pairs, rows):
            per_image[recs[p]["key"]] = {k: _plain(v) for k, v in row.items()}
        per_set[variant.name] = {k: _plain(v) for k, v in set_level.items()}
    write_text_atomic(config.output_dir / "metrics.jsonl",
                      "".join(json.dumps({"key": k, **v}) + "\n" for k, v in per_image.items()))
    write_text_atomic(config.output_dir / "metrics_sets.json", json.dumps(per_set, indent=2))
    return per_image, per_set


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# --- the interval=1 three-way check ----------------------------------------------------------------

INTERVAL1_KEYS = ("tolerance", "flags")


def run_interval1_check(section: dict[str, Any], base_argv: list[str]) -> dict[str, Any]:
    """The Chipmunk layer's interval=1 three-way check (utils/interval1_check.py) on the config's base
    flags plus `section["flags"]`: A dense, B dense + HiCache(1), C Chipmunk, D Chipmunk + HiCache(1);
    B must equal A bitwise and D equal C within `tolerance` (relative L2 error of the final latents)."""
    from utils.interval1_check import DEFAULT_TOLERANCE, format_table
    from utils.interval1_check import run_interval1_check as three_way_check

    argv = base_argv + flags_to_argv(section.get("flags") or {}, "interval1_check.flags")
    args = parse_variant_args(argv, "interval1_check")
    tolerance = float(section.get("tolerance", DEFAULT_TOLERANCE))
    rows, passed = three_way_check(args, tolerance)
    return {"status": "PASS" if passed else "FAIL", "passed": passed, "rows": rows, "table_md": format_table(rows),
            "tolerance": tolerance,
            "command": f"python run_benchmark.py --check interval1 --check_tolerance {tolerance} " + " ".join(argv)}

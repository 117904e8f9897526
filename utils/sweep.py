"""An ablation sweep: config schema and validation, the work list, the generation loop, JSONL records,
resume, sharding and merge. `run_ablation.py` is the command; `utils/reports.py` turns the records
into tables and plots.

Layout of `<output_dir>/`:
    config.yaml                      the config as resolved (base overrides applied), for the record
    <variant>/p0003_s1.png           one image per (variant, prompt index, seed)
    records/shard-<i>-of-<n>.jsonl   one JSON line per image (or per failure), appended + fsync'd
    records/*.lock                   held by the process generating a shard (or merging) while it runs
    records.jsonl                    all shards merged (written by the merge step)
    metrics/<variant>.json           a variant's metrics with a digest of their inputs: kept across reruns
    metrics.jsonl, metrics_sets.json per-image and set-level quality metrics
    summary.{csv,md,tex}, *.png, *.pdf

Resume: a record counts when its image is on disk and its prompt and seed are those of the current
prompt set (another --limit_prompts or prompts file regenerates what changed); a variant whose flags
changed is refused. Every file other than the appended records is written whole and then renamed
into place, so a kill at any moment leaves either the old file or the new one.

Weight reuse rule: the optimization stack only touches `pipeline.transformer` (and inductor's global
config, which is restored before every variant). A loaded pipeline is reused by the next variant
when both have the same `(ckpt, dtype, device)` and the previous variant's stack report shows no
transformer-mutating layer (QKV fusion, FA3 processors, Chipmunk, feature caching, float8 quant,
compile/export) as applied; otherwise it is dropped and reloaded, and dynamo's caches are reset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import difflib
import fcntl
import gc
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from utils.benchmark_utils import (STAGE_TIMER, annotate_pipeline, check_args, create_parser, environment_record,
                                   pipeline_call_kwargs, resolved_defaults, stack_flags, transformer_flops)

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
    "clip_model": "the CLIP score's model: ViT-L-14 (OpenAI weights; the default) or ViT-g-14 (LAION-2B, as "
                  "cache-dit reports)",
    "input_image": "FLUX.1-Kontext editing sweeps: one input image for every prompt (or an `edits:` prompt file "
                   "with an image per prompt)",
    "fid_reference_dir": "a folder of real images (e.g. COCO val) for a second FID per variant",
    "report": "{pareto_metrics: [...], grid_prompts: N}",
    "interval1_check": "run the Chipmunk interval=1 three-way check and report PASS/FAIL",
}
VARIANT_KEYS = ("name", "flags", "description")
PROMPT_KEYS = ("spec", "limit")
REPORT_KEYS = ("pareto_metrics", "grid_prompts")
INTERVAL1_KEYS = ("tolerance", "flags")
# The sweep sets these per image or not at all.
SWEEP_OWNED_FLAGS = {"prompt": "prompts come from `prompts:`", "seed": "seeds come from `seed:` and `seeds_per_prompt:`",
                     "output_file": "images go under output_dir",
                     "image": "a Kontext editing sweep's images come from `input_image:` or an `edits:` prompt file",
                     "num_runs": "every (prompt, seed) is timed once", "warmup_runs": "use the top-level `warmup_runs:`",
                     "results_dir": "records go under output_dir", "trace_file": "use run_benchmark.py for traces",
                     "check": "use the config's interval1_check: section",
                     "check_tolerance": "use interval1_check: {tolerance: ...}"}
# Layers of optimize() that change the transformer module in place (see the module docstring).
MUTATING_LAYERS = ("qkv_fusion", "attention", "chipmunk", "feature_cache", "float8_quant", "compile_export")
# A variant's name is a folder of output_dir: no dots (`..`, `summary.csv`), not the sweep's own folders.
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_=+-]{0,63}")
RESERVED_NAMES = ("records", "metrics")
MIN_FREE_BYTES = 64 * 2**20  # less free space than this in output_dir's filesystem: refused as full


class ConfigError(ValueError):
    """A config that cannot run: reported before any image is generated."""


class OutputDirError(ConfigError):
    """output_dir cannot take the sweep's files: not writable, full, or another process runs the same shard."""


class OutputWriteError(OSError):
    """Writing into output_dir failed (disk full, read-only, ...): the sweep stops, what was written is kept."""


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
    clip_model: str = "ViT-L-14"
    input_image: str | None = None
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice (first on line {first})",
                                                        key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str) -> Any:
    """The YAML file's content; ConfigError (one line) for a missing, unreadable or invalid file."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: a folder, not a YAML file") from None
    except PermissionError:
        raise ConfigError(f"{what} {path}: not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


def _check_keys(section: dict, allowed: Iterable[str], where: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(section).__name__}")
    allowed = list(allowed)
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _int_at_least(value: Any, minimum: int, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum} (got {value!r})")
    return value


def _text(value: Any, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string (got {value!r})")
    return value


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
            raise ConfigError(f"{where}: unknown flag {key!r}{hint}; flags are those of "
                              f"`python run_benchmark.py --help`")
        option = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: flag {key!r} is a switch, give true or false (got {value!r})")
            if value:
                argv.append(option)
        elif isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: flag {key!r} takes one value (got {value!r})")
        elif value is not None:
            argv += [option, str(value)]
    return argv


def parse_variant_args(argv: list[str], where: str) -> argparse.Namespace:
    """create_parser() + resolved_defaults() + the checks of the flags alone (check_args), raising ConfigError
    (not SystemExit) on a bad value."""
    parser = create_parser()
    parser.exit_on_error = False
    try:
        args = resolved_defaults(parser.parse_args(argv))
        check_args(args, sweep_images=True)
    except (argparse.ArgumentError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return args


def load_config(path: str | Path, base_overrides: list[str] | None = None, output_dir: str | None = None,
                prompt_limit: int | None = None, seeds_per_prompt: int | None = None,
                only_variants: list[str] | None = None, check_machine: bool = True) -> SweepConfig:
    """Read and validate a sweep config: every key, every variant's flags, the prompt spec, the report and check
    sections. Everything that does not depend on the machine is checked before diffusers is imported; then, with
    `check_machine`, check_on_this_machine().

    `base_overrides` are `FLAG=VALUE` strings from the command line, applied to `base:` (for example
    fewer steps on a quick run)."""
    path = Path(path)
    raw = read_yaml(path, "--config")
    if raw is None:
        raw = {}
    _check_keys(raw, CONFIG_KEYS, str(path))
    for key in ("output_dir", "variants", "baseline"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key {key!r} ({CONFIG_KEYS[key]})")
    out = output_dir if output_dir is not None else _text(raw["output_dir"], f"{path}: output_dir")
    for key in ("name", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{path}: {key} must be a string (got {raw[key]!r})")

    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base must be a mapping of flag: value, got {type(base).__name__}")
    base = dict(base)
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
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name) or name.lower() in RESERVED_NAMES:
            raise ConfigError(f"{path}: variants[{i}]: a name is a folder of output_dir: 1 to 64 letters, digits and "
                              f"_=+-, starting with a letter or digit, not {' or '.join(RESERVED_NAMES)} "
                              f"(got {name!r})")
        if any(v.name.lower() == name.lower() for v in variants):  # one folder on a case-insensitive filesystem
            raise ConfigError(f"{path}: variant name {name!r} appears twice")
        where = f"{path}: variant {name!r}"
        if entry.get("description") is not None and not isinstance(entry["description"], str):
            raise ConfigError(f"{where}: description must be a string")
        flags = entry.get("flags")
        if flags is not None and not isinstance(flags, dict):
            raise ConfigError(f"{where}: flags must be a mapping of flag: value, got {type(flags).__name__}")
        argv = flags_to_argv({**base, **(flags or {})}, where)
        parse_variant_args(argv, where)
        variants.append(Variant(name=name, argv=argv, description=str(entry.get("description") or "")))

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
    spec = _text(prompts.get("spec", "default"), f"{path}: prompts.spec")
    limit = prompt_limit if prompt_limit is not None else prompts.get("limit")
    if limit is not None:
        _int_at_least(limit, 1, f"{path}: prompts.limit")

    n_seeds = seeds_per_prompt if seeds_per_prompt is not None else raw.get("seeds_per_prompt", 1)
    first_seed = raw.get("seed", 0)
    for key, value, minimum in (("seeds_per_prompt", n_seeds, 1), ("seed", first_seed, 0),
                                ("warmup_runs", raw.get("warmup_runs", 1), 0),
                                ("metrics_batch_size", raw.get("metrics_batch_size", 16), 1)):
        _int_at_least(value, minimum, f"{path}: {key}")

    metrics = raw.get("metrics") or []
    if not isinstance(metrics, list):
        raise ConfigError(f"{path}: metrics must be a list, e.g. [psnr, ssim] (got {metrics!r})")
    from utils.metrics import METRIC_NAMES as known_metrics

    for m in metrics:
        if m not in known_metrics:
            raise ConfigError(f"{path}: unknown metric {m!r} (choose from {', '.join(known_metrics)})")
    random_init = raw.get("metrics_random_init", False)
    if not isinstance(random_init, bool):
        raise ConfigError(f"{path}: metrics_random_init must be true or false (got {random_init!r})")
    weights_dir = _text(raw.get("metrics_weights_dir"), f"{path}: metrics_weights_dir", optional=True)
    from utils.metric_models import CLIP_MODELS

    clip_model = raw.get("clip_model", "ViT-L-14")
    if clip_model not in CLIP_MODELS:
        raise ConfigError(f"{path}: clip_model must be one of {', '.join(CLIP_MODELS)} (got {clip_model!r})")
    input_image = _text(raw.get("input_image"), f"{path}: input_image", optional=True)
    if input_image is not None and not input_image.startswith(("http://", "https://")) and \
            not Path(input_image).is_file():
        raise ConfigError(f"{path}: input_image {input_image}: no such file")
    fid_reference_dir = _text(raw.get("fid_reference_dir"), f"{path}: fid_reference_dir", optional=True)
    if fid_reference_dir is not None:
        check_fid_reference_dir(fid_reference_dir, metrics, f"{path}: fid_reference_dir")

    report = raw.get("report") or {}
    _check_keys(report, REPORT_KEYS, f"{path}: report")
    report = dict(report)
    pareto = report.get("pareto_metrics")
    if pareto is not None and not isinstance(pareto, list):
        raise ConfigError(f"{path}: report.pareto_metrics must be a list of metric names (got {pareto!r})")
    for m in pareto or []:
        if m not in metrics or m not in known_metrics:
            raise ConfigError(f"{path}: report.pareto_metrics: {m!r} is not among the config's metrics")
    if "grid_prompts" in report:
        _int_at_least(report["grid_prompts"], 1, f"{path}: report.grid_prompts")

    interval1 = raw.get("interval1_check")
    if interval1 is not None:
        _check_keys(interval1, INTERVAL1_KEYS, f"{path}: interval1_check")
        tolerance = interval1.get("tolerance")
        if tolerance is not None and (not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool)
                                      or not math.isfinite(tolerance) or tolerance <= 0):
            raise ConfigError(f"{path}: interval1_check.tolerance must be a number > 0 (got {tolerance!r})")
        extra = flags_to_argv(interval1.get("flags") or {}, f"{path}: interval1_check.flags")
        parse_variant_args(base_argv + extra, f"{path}: interval1_check")

    config = SweepConfig(
        name=str(raw.get("name") or path.stem), path=str(path), description=str(raw.get("description") or ""),
        output_dir=Path(out), baseline=baseline, variants=variants,
        base_argv=base_argv, prompt_spec=spec, prompt_limit=limit,
        seeds=list(range(first_seed, first_seed + n_seeds)), warmup_runs=raw.get("warmup_runs", 1),
        metrics=list(metrics), metrics_random_init=random_init,
        metrics_weights_dir=weights_dir, metrics_batch_size=raw.get("metrics_batch_size", 16),
        fid_reference_dir=fid_reference_dir, clip_model=clip_model, input_image=input_image,
        report=report, interval1_check=interval1, raw={**raw, "base": base})
    if check_machine:
        check_on_this_machine(config)
    return config


def check_fid_reference_dir(folder: str, metrics: list[str], where: str) -> None:
    from utils.metrics import IMAGE_SUFFIXES

    if "fid" not in metrics:
        raise ConfigError(f"{where}: a second FID against real images needs the 'fid' metric in metrics")
    if not Path(folder).is_dir():
        raise ConfigError(f"{where}: no such folder {folder}")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(folder).rglob("*")):
        raise ConfigError(f"{where}: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")


def refused_on_a_cuda_host(argv: list[str]) -> str | None:
    """validate_args' refusal of these flags on a host with a CUDA GPU (this host's CUDA answer replaced by yes):
    a config mistake wherever the sweep runs. A package to install is this host's matter, not the config's."""
    from unittest import mock

    from utils.pipeline_utils import StackError, validate_args

    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        args = parse_variant_args(argv, "")  # --device defaults to cuda there, as it would on a GPU host
        try:
            validate_args(args)
        except StackError as e:
            return None if "pip install" in str(e) else str(e)
    return None


def check_on_this_machine(config: SweepConfig) -> None:
    """validate_args() for every variant (this imports diffusers and the stack). A refusal that a CUDA host would
    make too is a ConfigError; one of this machine only (say, a CUDA-only layer on a CPU host), or one that states
    what a library cannot run (LibraryLimitation), does not stop the sweep: that variant is kept with its error and
    recorded as failed."""
    from utils.errors import LibraryLimitation
    from utils.pipeline_utils import StackError, validate_args

    for variant in config.variants:
        where = f"{config.path}: variant {variant.name!r}"
        try:
            validate_args(parse_variant_args(variant.argv, where))
        except LibraryLimitation as e:  # what the library cannot run: listed as failed, with the reason
            variant.stack_error = str(e)
        except StackError as e:
            everywhere = refused_on_a_cuda_host(variant.argv)
            if everywhere is not None:
                raise ConfigError(f"{where}: {everywhere}") from None
            variant.stack_error = str(e)


def load_sweep_prompts(config: SweepConfig) -> list[dict[str, Any]]:
    """The config's prompt set; ConfigError (one line) for a missing, unreadable or malformed file."""
    from utils.prompts import load_prompts

    try:
        prompts = load_prompts(config.prompt_spec, limit=config.prompt_limit)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config.path}: prompts: {e}") from None
    if not prompts:
        raise ConfigError(f"{config.path}: the prompt set {config.prompt_spec!r} is empty")
    check_input_images(config, prompts)
    return prompts


def sweep_family(config: SweepConfig) -> str:
    from utils.benchmark_utils import model_family

    return model_family(parse_variant_args(config.base_argv, f"{config.path}: base").ckpt)


def check_input_images(config: SweepConfig, prompts: list[dict[str, Any]]) -> None:
    """A Kontext sweep edits an input image per prompt (the prompt file's, else `input_image:`); other pipelines take
    none."""
    edits = [p for p in prompts if p.get("image")]
    if sweep_family(config) == "flux-kontext":
        if config.input_image is None and len(edits) < len(prompts):
            raise ConfigError(f"{config.path}: FLUX.1-Kontext edits an image: set input_image: PATH (one image for "
                              f"every prompt), or use an `edits:PATH.tsv` prompt file (columns prompt, image)")
    elif config.input_image is not None or edits:
        raise ConfigError(f"{config.path}: input images are for FLUX.1-Kontext (ckpt tiny:flux-kontext, "
                          f"random:flux-kontext or black-forest-labs/FLUX.1-Kontext-dev): drop input_image or use "
                          f"a prompt set without images")


def input_image_of(config: SweepConfig, prompt: dict[str, Any]) -> str | None:
    return prompt.get("image") or config.input_image


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


# --- output folder --------------------------------------------------------------------------------

def check_output_dir(output_dir: Path, bytes_to_write: int = 0) -> str | None:
    """Refuse (OutputDirError) an output_dir that cannot be created or written, or whose filesystem is full (less
    than MIN_FREE_BYTES free). Returns a warning when less is free than `bytes_to_write` (what the images still to
    generate take at most, as raw pixels)."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".write-check-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = shutil.disk_usage(output_dir).free
    except OSError as e:
        raise OutputDirError(f"output_dir {output_dir}: cannot write there ({e.strerror or e}); fix its permissions "
                             f"or free space, or pass --output_dir elsewhere") from None
    if free < MIN_FREE_BYTES:
        raise OutputDirError(f"output_dir {output_dir}: its filesystem is full ({free / 2**20:.1f} MiB free); free "
                             f"space, or pass --output_dir elsewhere")
    if free < bytes_to_write:
        return (f"output_dir {output_dir}: {free / 2**30:.2f} GiB free, and the images still to generate take up to "
                f"{bytes_to_write / 2**30:.2f} GiB (raw pixels; PNG is smaller)")
    return None


def hold_lock(output_dir: Path, name: str):
    """Take records/<name>.lock exclusively, or refuse (OutputDirError) if another process holds it: two runs of
    one shard in one folder would generate the same images twice. The lock lasts until the returned file is
    closed or the process ends (the kernel releases it on SIGKILL too)."""
    path = Path(output_dir) / "records" / f"{name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = path.open("a+")
    except OSError as e:
        raise OutputDirError(f"output_dir {output_dir}: cannot write there ({e.strerror or e})") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise OutputDirError(f"output_dir {output_dir}: {name} is being run by {holder}; wait for it to end, or use "
                             f"another output_dir") from None
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on {platform.node()}\n")
    file.flush()
    return file


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file under a temporary name of this process, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def latest_ok_records(records: list[dict[str, Any]], output_dir: Path,
                      prompts: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """key -> the last 'ok' record whose image is on disk and, given `prompts`, whose prompt is the one of its
    prompt index in that set (another prompt set reuses indices: those images are generated again)."""
    done = {}
    for rec in records:
        if rec.get("status") != "ok" or not (Path(output_dir) / rec["image"]).exists():
            continue
        if prompts is not None:
            index = rec.get("prompt_index")
            if not isinstance(index, int) or not 0 <= index < len(prompts) or \
                    rec.get("prompt") != prompts[index]["prompt"]:
                continue
        done[rec["key"]] = rec
    return done


class RecordWriter:
    """Saves images atomically and appends records durably, on one background thread so that PNG
    encoding and fsync overlap the next generation. The record is written after its image is in place,
    so a record always has its image. An OSError of a write is raised as OutputWriteError (the folder's
    fault, not the variant's); drain() raises the first failure of the writes submitted so far."""

    def __init__(self, output_dir: Path, shard: tuple[int, int]):
        self.output_dir = Path(output_dir)
        self.path = records_path(output_dir, shard)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_jsonl(self.path)
            self.file = self.path.open("a")
        except OSError as e:
            raise OutputWriteError(f"cannot write {self.path}: {e.strerror or e}") from None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="record-writer")
        self.pending: list[concurrent.futures.Future] = []

    def append(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record, default=str) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise OutputWriteError(f"cannot append to {self.path}: {e.strerror or e}") from None

    def _save(self, image, record: dict[str, Any]) -> None:
        path = self.output_dir / record["image"]
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                image.save(f, format="PNG", compress_level=1)  # fast: PNG compression is not what we time
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise OutputWriteError(f"cannot write {path}: {e.strerror or e}") from None
        self.append(record)

    def submit(self, image, record: dict[str, Any]) -> None:
        self.pending.append(self.pool.submit(self._save, image, record))
        finished = [f for f in self.pending if f.done()]
        self.pending = [f for f in self.pending if f not in finished]
        for f in finished:
            f.result()  # surface a failed write now, not at the end of the sweep

    def drain(self) -> None:
        """Wait for every submitted write; raise the first failure."""
        pending, self.pending = self.pending, []
        errors = [f.exception() for f in pending]
        for error in errors:
            if error is not None:
                raise error

    def close(self) -> None:
        """Finish the submitted writes and close the file; their failures are drain()'s to raise."""
        self.pool.shutdown(wait=True)
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
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Their per-component loading bars would cut the sweep's own bar apart; the sweep's bar says "loading".
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        loaded.pipeline, loaded.load_key = load_pipeline(args), load_key
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
    return loaded.pipeline


def dense_flops_per_forward(loaded: LoadedPipeline, pipeline, args: argparse.Namespace) -> int:
    """FLOPs of one eager, unoptimized transformer forward, counted once per checkpoint and shape."""
    key = (args.ckpt, args.height, args.width, args.max_sequence_length)
    if key not in loaded.dense_flops:
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


def generate_image(pipeline, args: argparse.Namespace, prompt: str, seed: int, image: str | None = None):
    # torch.manual_seed(seed) as in gen_image.py, so that a record's `reproduce` command gives its image.
    if image is not None:  # a Kontext editing sweep: this prompt's input image
        args = argparse.Namespace(**{**vars(args), "image": image})
    kwargs = {**pipeline_call_kwargs(args), "prompt": prompt}
    return pipeline(**kwargs, generator=torch.manual_seed(seed), output_type="pil").images[0]


def reproduce_command(variant: Variant, prompt: str, seed: int, image: str | None = None) -> str:
    import shlex

    edit = ["--image", shlex.quote(image)] if image else []
    return " ".join(["python gen_image.py", *map(shlex.quote, variant.argv), *edit, "--prompt", shlex.quote(prompt),
                     "--seed", str(seed), "--output-file", "reproduced.png"])


@dataclass
class GenerationTiming:
    wall_s: float = 0.0
    setup_s: float = 0.0  # load, FLOP count, optimize (compile) and warm-up
    images: int = 0
    sum_latency_s: float = 0.0


def stack_line(stack: dict[str, str]) -> str:
    """optimize()'s layer report (one `[stack]` line per layer) in one line: what was applied (and how), what is
    unavailable here (and why), what was skipped. The full report is in every record."""
    applied, unavailable, skipped = [], [], []
    for layer, status in stack.items():
        if status.startswith("applied"):
            detail = "" if layer == "inductor_flags" else status.partition(": ")[2]  # the flags' list is long
            applied.append(f"{layer} {detail}" if detail else layer)
        elif status.startswith("unavailable"):
            reason = re.match(r"unavailable \(([^)]*)\)", status)
            unavailable.append(f"{layer} ({reason[1]})" if reason else layer)
        else:
            skipped.append(layer)
    parts = [f"applied {', '.join(applied)}" if applied else "nothing applied"]
    if unavailable:
        parts.append(f"unavailable {', '.join(unavailable)}")
    if skipped:
        parts.append(f"skipped {', '.join(skipped)}")
    return "; ".join(parts)


def raw_image_bytes(args: argparse.Namespace) -> int:
    return args.height * args.width * 3


def run_generation(config: SweepConfig, prompts: list[dict[str, Any]], shard: tuple[int, int],
                   device: str | None = None, show_progress: bool = True) -> GenerationTiming:
    """Generate this shard's missing images; a failing variant is recorded as failed and skipped. A write that
    fails (disk full, read-only folder) stops the sweep with OutputWriteError: it is no variant's fault.

    What the stack prints while a variant loads and is optimized is gathered and shown between the progress
    bar's updates, once per sweep for a line that repeats (the tiny pipeline's notice), its `[stack]` lines
    as one (stack_line)."""
    from tqdm import tqdm

    from utils.pipeline_utils import optimize, validate_args

    started = time.perf_counter()
    timing = GenerationTiming()
    output_dir = config.output_dir
    items = work_list(config, len(prompts), shard)
    existing = read_all_records(output_dir)
    check_flags_unchanged(config, existing)
    done = latest_ok_records(existing, output_dir, prompts)
    todo = [it for it in items if it.key not in done]
    print(f"[sweep] shard {shard[0]}/{shard[1]}: {len(items)} images, {len(items) - len(todo)} already done, "
          f"{len(todo)} to generate")
    if not todo:
        return timing

    writer = RecordWriter(output_dir, shard)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="generation", unit="img",
               disable=not show_progress, dynamic_ncols=True)
    loaded = LoadedPipeline()
    inductor_defaults = torch._inductor.config.get_config_copy()
    shown: set[str] = set()
    try:
        for variant in config.variants:
            variant_todo = [it for it in todo if it.variant == variant.name]
            if not variant_todo:
                continue
            setup_started = time.perf_counter()
            generated, pipeline = 0, None
            try:
                args = parse_variant_args(variant.argv, variant.name)
                if device is not None and args.device.startswith("cuda"):
                    args.device = device  # torchrun: this rank's GPU
                validate_args(args)  # re-raises the StackError found at load time, if any
                torch._inductor.config.load_config(inductor_defaults)  # undo a previous variant's flags
                printed = io.StringIO()
                try:
                    with contextlib.redirect_stdout(printed):
                        bar.set_postfix_str(f"{variant.name}: loading")
                        pipeline = prepare_pipeline(loaded, args)
                        flops_fwd = dense_flops_per_forward(loaded, pipeline, args)
                        bar.set_postfix_str(f"{variant.name}: optimizing")
                        optimize(pipeline, args)
                finally:  # every line, [stack] ones too, if optimize() did not finish
                    stack = getattr(pipeline, "harness_stack", None) if pipeline is not None else None
                    for line in printed.getvalue().splitlines():
                        if line not in shown and not (stack is not None and line.startswith("[stack]")):
                            bar.write(line)
                            shown.add(line)
                bar.write(f"[sweep] {variant.name}: {stack_line(pipeline.harness_stack)}")
                loaded.pristine = all(not status.startswith("applied") for layer, status in
                                      pipeline.harness_stack.items() if layer in MUTATING_LAYERS)
                loaded.compiled = loaded.compiled or args.compile_export_mode != "disabled"
                env = environment_record(args.device)
                cuda = args.device.startswith("cuda")
                with annotate_pipeline(pipeline):
                    first = prompts[variant_todo[0].prompt_index]
                    bar.set_postfix_str(f"{variant.name}: warm-up")
                    for _ in range(config.warmup_runs):
                        generate_image(pipeline, args, first["prompt"], variant_todo[0].seed,
                                       input_image_of(config, first))
                    timing.setup_s += time.perf_counter() - setup_started
                    bar.set_postfix_str(variant.name)
                    for item in variant_todo:
                        prompt = prompts[item.prompt_index]
                        record = time_one_image(pipeline, args, variant, item, prompt, flops_fwd, cuda, env, shard,
                                                input_image_of(config, prompt))
                        writer.submit(record.pop("_image"), record)
                        timing.images += 1
                        timing.sum_latency_s += record["latency_s"]
                        generated += 1
                        bar.update(1)
                writer.drain()  # this variant's writes: a failure among them is this variant's or the folder's
            except OutputWriteError:
                raise
            except (Exception, SystemExit) as e:  # noqa: BLE001 - OOM, StackError, a missing package (the core
                # exits with a message then): record it and go on
                message = f"{type(e).__name__}: {e}"
                bar.write(f"[sweep] variant {variant.name} FAILED: {message}")
                failure = {"key": f"{variant.name}/failed", "status": "failed", "variant": variant.name,
                           "error": message, "traceback": traceback.format_exc()[-4000:],
                           "argv": variant.argv, "shard": f"{shard[0]}/{shard[1]}",
                           "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                e.__traceback__ = None  # let go of the frames that hold GPU tensors
                pipeline = None
                release(loaded)  # the failure may have left the transformer half-optimized
                try:  # the images written before the failure; a folder failure stops the sweep here
                    writer.drain()
                except OutputWriteError:
                    raise
                except Exception:  # noqa: BLE001 - another failure of this variant, which is failed already
                    pass
                writer.append(failure)
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
                   cuda: bool, env: dict[str, Any], shard: tuple[int, int],
                   input_image: str | None = None) -> dict[str, Any]:
    from utils.benchmark_utils import time_call

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    STAGE_TIMER.enabled = True
    STAGE_TIMER.collect()  # drop warm-up events
    latency, image = time_call(lambda: generate_image(pipeline, args, prompt["prompt"], item.seed, input_image),
                               args.device)
    stages = {label: sum(values) for label, values in STAGE_TIMER.collect().items()}
    STAGE_TIMER.enabled = False
    counts = cache_counts(pipeline, args, flops_fwd)
    return {
        "key": item.key, "status": "ok", "variant": variant.name, "prompt_index": item.prompt_index,
        "prompt": prompt["prompt"], "category": prompt.get("category"), "source": prompt.get("source"),
        "seed": item.seed, "image": item.image, "input_image": input_image,
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
        "reproduce": reproduce_command(variant, prompt["prompt"], item.seed, input_image),
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
    done = latest_ok_records(everything, output_dir, prompts)
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


# --- metrics ---------------------------------------------------------------------------------------

def _image_stamp(config: SweepConfig, rec: dict[str, Any]) -> list:
    """What identifies one image's content for the metrics cache: its record and the file's modification time."""
    return [rec["key"], rec["prompt"], rec["seed"], rec.get("written_utc"),
            os.stat(config.output_dir / rec["image"]).st_mtime_ns]


def metrics_inputs_digest(config: SweepConfig, weights_dir: str | None, recs: list[dict],
                          refs: list[dict] | None) -> str:
    """A digest of everything a variant's metric values depend on: the metrics, their models, batch size, the
    variant's images and the baseline images they are compared with."""
    inputs = {"metrics": config.metrics, "batch_size": config.metrics_batch_size, "clip_model": config.clip_model,
              "models": "random-init" if config.metrics_random_init else
              (str(Path(weights_dir).resolve()) if weights_dir else None),
              "fid_reference_dir": str(Path(config.fid_reference_dir).resolve()) if config.fid_reference_dir else None,
              "images": [_image_stamp(config, r) for r in recs],
              "refs": [_image_stamp(config, r) for r in refs] if refs is not None else None}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def compute_sweep_metrics(config: SweepConfig, merged: MergedSweep, device: str, weights_dir: str | None = None,
                          show_progress: bool = False) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per-image metrics (key -> {metric: value}) and set-level metrics (variant -> {...}).

    Reference metrics compare each image with the baseline image of the same prompt and seed (pairs
    where both exist); the baseline itself gets the prompt metrics only (refs=None), its reference
    metrics being trivially ideal. Each variant's values are kept in metrics/<variant>.json with a digest
    of their inputs, and reused while the digest matches: a rerun (after a kill, or to redo the reports)
    computes only what changed. Written to metrics.jsonl and metrics_sets.json."""
    if not config.metrics:
        return {}, {}
    from tqdm import tqdm

    from utils.metrics import compute_metrics, load_image_files, load_metric_models

    weights_dir = weights_dir or config.metrics_weights_dir
    by_variant: dict[str, dict[tuple, dict]] = {}
    for rec in merged.records:
        by_variant.setdefault(rec["variant"], {})[(rec["prompt_index"], rec["seed"])] = rec
    baseline = by_variant.get(config.baseline, {})
    plan = []  # (variant, pairs, digest, cached values or None)
    for variant in config.variants:
        recs = by_variant.get(variant.name, {})
        is_baseline = variant.name == config.baseline
        pairs = sorted(recs) if is_baseline else sorted(set(recs) & set(baseline))
        if not pairs:
            continue
        digest = metrics_inputs_digest(config, weights_dir, [recs[p] for p in pairs],
                                       None if is_baseline else [baseline[p] for p in pairs])
        cache = config.output_dir / "metrics" / f"{variant.name}.json"
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            cached = None
        plan.append((variant.name, pairs, digest, cached if cached and cached.get("inputs") == digest else None))

    total = sum(len(pairs) for _, pairs, _, _ in plan)
    reused = sum(len(pairs) for _, pairs, _, cached in plan if cached is not None)
    bar = tqdm(total=total, initial=reused, desc="metrics", unit="img", disable=not show_progress,
               dynamic_ncols=True)
    workers = min(16, os.cpu_count() or 1)
    models, baseline_images = None, None
    per_image, per_set = {}, {}
    try:
        for name, pairs, digest, cached in plan:
            if cached is None:
                if models is None:
                    bar.set_postfix_str("loading metric models")
                    models = load_metric_models(config.metrics, weights_dir, random_init=config.metrics_random_init,
                                                device=device, fid_reference_dir=config.fid_reference_dir,
                                                clip_model=config.clip_model)
                    # (prompt_index, seed) -> uint8 image: decoded once, the reference of every variant
                    keys = sorted(baseline)
                    decoded = load_image_files([config.output_dir / baseline[p]["image"] for p in keys], workers)
                    baseline_images = dict(zip(keys, decoded))
                bar.set_postfix_str(name)
                recs = by_variant[name]
                if name == config.baseline:
                    images, refs = torch.stack([baseline_images[p] for p in pairs]), None
                else:
                    images = load_image_files([config.output_dir / recs[p]["image"] for p in pairs], workers)
                    refs = torch.stack([baseline_images[p] for p in pairs])
                rows, set_level = compute_metrics(config.metrics, images, refs, [recs[p]["prompt"] for p in pairs],
                                                  models, batch_size=config.metrics_batch_size, progress=bar.update)
                cached = {"inputs": digest,
                          "per_image": {recs[p]["key"]: {k: _plain(v) for k, v in row.items()}
                                        for p, row in zip(pairs, rows)},
                          "per_set": {k: _plain(v) for k, v in set_level.items()}}
                write_text_atomic(config.output_dir / "metrics" / f"{name}.json", json.dumps(cached))
            per_image.update(cached["per_image"])
            per_set[name] = cached["per_set"]
    finally:
        bar.close()
    write_text_atomic(config.output_dir / "metrics.jsonl",
                      "".join(json.dumps({"key": k, **v}) + "\n" for k, v in per_image.items()))
    write_text_atomic(config.output_dir / "metrics_sets.json", json.dumps(per_set, indent=2))
    return per_image, per_set


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# --- the interval=1 three-way check ----------------------------------------------------------------


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

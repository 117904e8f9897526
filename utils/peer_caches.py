"""Other libraries' feature caches as `--cache_mode` choices, applied by those libraries: diffusers' cache hooks
(`ModelMixin.enable_cache(config)`, diffusers' CacheMixin) here, cache-dit's DBCache in utils/caching.py. Nothing
of their methods is written here: this module builds the library's config object from a YAML file and a few flags,
attaches it with the library's own call, and counts what ran.

The hooks diffusers 0.42.1 has, and the mode that selects each (configs/peer_caches/ holds their settings):

| --cache_mode | diffusers config | hooks | decides from |
|---|---|---|---|
| diffusers_fbc | FirstBlockCacheConfig | every block; the first decides | block 0's residual change |
| diffusers_taylorseer | TaylorSeerCacheConfig | every block's attention | the step count |
| diffusers_taylorseer_lite | TaylorSeerCacheConfig(use_lite_mode=True) | blocks, `proj_out` | the step count |
| diffusers_magcache | MagCacheConfig (FLUX_MAG_RATIOS on FLUX) | every block; the first decides | magnitude ratios |
| diffusers_fastercache | FasterCacheConfig | every attention | iteration count, timestep range |
| diffusers_pab | PyramidAttentionBroadcastConfig | every attention | iteration count, timestep range |

(diffusers 0.42.1 also has SeaCacheConfig and TextKVCacheConfig; they are not wired here.)

How they compose with the stack (`validate_peer_cache_args` refuses the rest before any work, naming the fix):

* torch.compile (`--compile_mode default` / `max-autotune-no-cudagraphs`): regional, with graph breaks. Every hook
  takes its decision in code that diffusers marks `torch.compiler.disable` (FBC's residual test, TaylorSeer's step
  count and forecast) or in a Python branch on the timestep (PAB, FasterCache), so a block cannot compile as one
  graph (`fullgraph=True` fails with "Skip inlining torch.compiler.disable()d function" or "Data-dependent
  branching"); the blocks are compiled with `fullgraph=False` and dynamo splits them there. MagCache is refused:
  its hooks run each block's whole forward under `torch.compiler.disable`, so nothing of the blocks would compile.
* CUDA-graph compile modes (`reduce-overhead`, `max-autotune`) and `export_aoti`: refused. A recorded graph runs
  no Python, and every hook decides in Python each step.
* Chipmunk: refused. Its sparse layers keep per-step caches whose refresh schedule is booked by the harness's own
  cache; a block that a diffusers hook skips would leave them stale.
* Context parallelism: refused. FBC's and MagCache's decisions come from each rank's share of the tokens (ranks
  that disagree enter different collectives and hang); the scheduled hooks have no multi-process check here.
* QKV fusion, FA3, float8, inductor flags: applied unchanged (the hooks wrap modules, not their kernels).

Step counts and FLOPs, as the harness's own cache reports them (`transformer.harness_cache.stats()`): the probe
wraps each hooked module's `original_forward` in the hook's own function reference (diffusers' HookFunctionReference),
so a module whose cached or forecast output was used is one whose original forward did not run. A step is *full*
when every hooked module ran, *cached* otherwise. The first generation of each schedule (timesteps and input
shapes) runs eagerly under FlopCounterMode and counts both the modules that ran and the FLOPs per step kind; in later
generations the scheduled hooks repeat that generation's pattern (they decide from the step and the timestep alone),
and FBC's and MagCache's decisions are read from the state their leading hook keeps (`should_compute`). The counting
wrapper reads one Python flag that is False outside the counted generation, so compiled code guards on it once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from utils.benchmark_utils import DATA_DEPENDENT_CACHES, PEER_CACHE_MODES, model_family
from utils.errors import LibraryLimitation, StackError
from utils.step_clock import StepClock


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    config_class: str  # the diffusers config dataclass
    leader_hook: str | None  # the hook whose state holds a data-dependent decision (None: scheduled)
    flags: tuple[tuple[str, str], ...]  # (config field, harness flag) pairs that fill the field
    fixed: tuple[tuple[str, Any], ...] = ()  # fields this mode sets, which the YAML may not change
    what: str = ""


PEER_SPECS: dict[str, PeerSpec] = {
    "diffusers_fbc": PeerSpec("FirstBlockCacheConfig", "fbc_leader_block_hook",
                              (("threshold", "fbcache_threshold"),),
                              what="First Block Cache (ParaAttention's FBCache)"),
    "diffusers_taylorseer": PeerSpec("TaylorSeerCacheConfig", None,
                                     (("cache_interval", "interval"), ("max_order", "max_order"),
                                      ("disable_cache_before_step", "first_enhance")),
                                     (("use_lite_mode", False),), what="TaylorSeer"),
    "diffusers_taylorseer_lite": PeerSpec("TaylorSeerCacheConfig", None,
                                          (("cache_interval", "interval"), ("max_order", "max_order"),
                                           ("disable_cache_before_step", "first_enhance")),
                                          (("use_lite_mode", True),), what="TaylorSeer, lite mode"),
    "diffusers_magcache": PeerSpec("MagCacheConfig", "mag_cache_leader_block_hook", (), what="MagCache"),
    "diffusers_fastercache": PeerSpec("FasterCacheConfig", None, (), (("is_guidance_distilled", True),),
                                      what="FasterCache"),
    "diffusers_pab": PeerSpec("PyramidAttentionBroadcastConfig", None, (),
                              what="Pyramid Attention Broadcast"),
}
assert set(PEER_SPECS) == set(PEER_CACHE_MODES)
DATA_DEPENDENT_PEERS = tuple(mode for mode, spec in PEER_SPECS.items() if spec.leader_hook is not None)
assert set(DATA_DEPENDENT_PEERS) == set(DATA_DEPENDENT_CACHES) & set(PEER_SPECS)
# Names of the hooks diffusers registers per cached module (hooks/*.py); FasterCache's denoiser-level hook, on the
# transformer itself, only skips a batched unconditional branch, which one call per step does not have.
CACHE_HOOK_NAMES = ("fbc_leader_block_hook", "fbc_block_hook", "taylorseer_cache", "mag_cache_leader_block_hook",
                    "mag_cache_block_hook", "faster_cache_block", "pyramid_attention_broadcast")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Hooks whose state lives in a diffusers StateManager keyed by the pipeline's `transformer.cache_context(name)`: they
# need a pipeline that calls its transformer inside one (MagCache sets a context itself; PAB and FasterCache keep
# their state on the hook).
NEEDS_CACHE_CONTEXT = ("diffusers_fbc", "diffusers_taylorseer", "diffusers_taylorseer_lite")
# Keys of the YAML that are the harness's, not a config field.
HARNESS_KEYS = {"cache_mode": "the --cache_mode this file is for (checked)",
                "attention_weight": "FasterCache: the constant weight of its attention extrapolation (diffusers' "
                                    "default callback: 0.5)"}


def is_peer_mode(mode: str) -> bool:
    return mode in PEER_SPECS


def config_class(mode: str):
    import diffusers.hooks

    return getattr(diffusers.hooks, PEER_SPECS[mode].config_class)


# --- the config: YAML + flags -> the library's dataclass ----------------------------------------------

def read_peer_yaml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise StackError(f"--peer_cache_config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise StackError(f"--peer_cache_config {path}: not valid YAML: {' '.join(str(e).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise StackError(f"--peer_cache_config {path}: a mapping of the config's fields, got {type(raw).__name__}")
    return raw


def _settable_fields(mode: str) -> dict[str, dataclasses.Field]:
    """The config's fields a YAML may set: not the callbacks (the harness gives the timestep), not private ones."""
    return {f.name: f for f in dataclasses.fields(config_class(mode))
            if not f.name.startswith("_") and not f.name.endswith("_callback")}


def _convert(mode: str, name: str, value: Any, default: Any, where: str) -> Any:
    """A YAML value as the field's type (lists become tuples where the default is a tuple; dtype names become
    dtypes; MagCache's `mag_ratios: flux` is diffusers' FLUX_MAG_RATIOS)."""
    if name == "taylor_factors_dtype":
        if value not in DTYPES:
            raise StackError(f"{where}: taylor_factors_dtype must be one of {', '.join(DTYPES)} (got {value!r})")
        return DTYPES[value]
    if name == "mag_ratios":
        if isinstance(value, str) and value.lower() == "flux":
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

            return FLUX_MAG_RATIOS.clone()
        if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              for v in value):
            raise StackError(f"{where}: mag_ratios must be a list of numbers or 'flux' (got {value!r})")
        return torch.tensor(value, dtype=torch.float32)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise StackError(f"{where}: {name} is true or false (got {value!r})")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or (default and len(value) != len(default)):
            raise StackError(f"{where}: {name} is a list like {list(default)} (got {value!r})")
        return tuple(value)
    if isinstance(default, int) or (default is None and isinstance(value, int)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise StackError(f"{where}: {name} is an integer (got {value!r})")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise StackError(f"{where}: {name} is a number (got {value!r})")
        return float(value)
    return value


def peer_config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config's field values for args.cache_mode: the mapped flags, then the YAML (which may not contradict a
    flag given on the command line with another value), then what the mode fixes. Raises StackError, naming the
    fix, for an unknown key, a value of the wrong type or a value the harness cannot run."""
    from utils.benchmark_utils import create_parser

    mode = args.cache_mode
    spec = PEER_SPECS[mode]
    path = getattr(args, "peer_cache_config", None)
    where = f"--peer_cache_config {path}" if path else f"--cache_mode {mode}"
    raw = read_peer_yaml(path)
    fields = _settable_fields(mode)
    for key in raw:
        if key not in fields and key not in HARNESS_KEYS:
            allowed = list(fields) + list(HARNESS_KEYS)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = (f" (did you mean {close[0]!r}?)" if close else
                    f" (fields of {spec.config_class}: {', '.join(fields)})")
            raise StackError(f"{where}: unknown key {key!r} for --cache_mode {mode}{hint}")
    if raw.get("cache_mode", mode) != mode:
        raise StackError(f"{where} is for --cache_mode {raw['cache_mode']}, not {mode}: pass --cache_mode "
                         f"{raw['cache_mode']}, or another file")
    if "attention_weight" in raw and mode != "diffusers_fastercache":
        raise StackError(f"{where}: attention_weight is FasterCache's (--cache_mode diffusers_fastercache)")

    defaults = create_parser().parse_args([])
    values: dict[str, Any] = {}
    for field, flag in spec.flags:
        given = getattr(args, flag)
        values[field] = given
        if field in raw and raw[field] != given and given != getattr(defaults, flag):
            raise StackError(f"{where} sets {field}: {raw[field]!r} and --{flag} {given} says otherwise: set it in "
                             f"one place")
    for key, value in raw.items():
        if key in fields:
            values[key] = _convert(mode, key, value, fields[key].default, where)
    for key, value in spec.fixed:
        if key in raw and values[key] != value:
            reason = ("the harness runs one transformer call per step, so FasterCache's batched unconditional branch "
                      "does not exist" if key == "is_guidance_distilled" else
                      "use --cache_mode diffusers_taylorseer_lite or diffusers_taylorseer")
            raise StackError(f"{where}: {key} is {value!r} for --cache_mode {mode} ({reason})")
        values[key] = value
    if "attention_weight" in raw:
        weight = raw["attention_weight"]
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise StackError(f"{where}: attention_weight is a number (got {weight!r})")
        values["attention_weight"] = float(weight)

    # Ranges the libraries would not refuse themselves, or would refuse deep inside a generation.
    for name in ("threshold",):
        if name in values and not values[name] >= 0:
            raise StackError(f"{where}: {name} must be >= 0 (got {values[name]})")
    for name in ("cache_interval", "spatial_attention_block_skip_range", "temporal_attention_block_skip_range",
                 "cross_attention_block_skip_range", "max_skip_steps", "unconditional_batch_skip_range"):
        if values.get(name) is not None and values[name] < 1:
            raise StackError(f"{where}: {name} must be >= 1 (got {values[name]})")
    if mode.startswith("diffusers_taylorseer"):
        for name in ("max_order", "disable_cache_before_step"):
            if values[name] < 0:
                raise StackError(f"{where}: {name} must be >= 0 (got {values[name]})")
        values.setdefault("taylor_factors_dtype", torch.float32)  # diffusers' documented example; lossless
    if mode == "diffusers_magcache":
        steps = raw.get("num_inference_steps", args.num_inference_steps)
        if steps != args.num_inference_steps:
            raise StackError(f"{where}: num_inference_steps {steps} differs from --num_inference_steps "
                             f"{args.num_inference_steps} (MagCache counts steps to know when a generation ends): "
                             f"drop it from the file")
        values["num_inference_steps"] = args.num_inference_steps
    if mode == "diffusers_pab" and all(values.get(k) is None for k in (
            "spatial_attention_block_skip_range", "temporal_attention_block_skip_range",
            "cross_attention_block_skip_range")):
        values["spatial_attention_block_skip_range"] = 2  # what diffusers falls back to (with a warning)
    return values


def validate_peer_cache_args(args: argparse.Namespace) -> None:
    """Refuse what a diffusers cache cannot run with, before any work (called by validate_args). The refusals are
    LibraryLimitations: a sweep lists such a variant as failed with the reason; bad values in the YAML or flags are
    StackErrors (a config mistake)."""
    from utils.compile_utils import CUDAGRAPH_MODES

    mode = args.cache_mode
    flag = f"--cache_mode {mode}"
    refuse = LibraryLimitation
    if args.chipmunk_config is not None and not args.disable_chipmunk:
        raise refuse(f"{flag} cannot run with Chipmunk: Chipmunk's sparse layers keep per-step caches whose refresh "
                     f"is booked by the harness's own cache, and a block that diffusers' hook skips would leave them "
                     f"stale. Pass --disable_chipmunk, or use --cache_mode fora/taylor/hicache")
    if args.compile_export_mode == "export_aoti":
        raise refuse(f"--compile_export_mode export_aoti cannot hold {flag}: the exported graph is one fixed full "
                     f"forward and diffusers' hooks decide each step in Python. Use --compile_export_mode compile "
                     f"(regional, with graph breaks at the hooks) or disabled")
    if args.compile_export_mode == "compile" and args.compile_mode in CUDAGRAPH_MODES:
        raise refuse(f"--compile_mode {args.compile_mode} replays recorded CUDA graphs, which run no Python, and "
                     f"diffusers' hooks ({flag}) decide each step in Python: use --compile_mode default (or "
                     f"max-autotune-no-cudagraphs)")
    if mode == "diffusers_magcache" and args.compile_export_mode == "compile":
        raise refuse(f"{flag} cannot be compiled: diffusers' MagCache hooks run each block's whole forward under "
                     f"torch.compiler.disable, so torch.compile would compile nothing of the blocks. Use "
                     f"--compile_export_mode disabled")
    if getattr(args, "context_parallel", "none") != "none":
        why = ("its skip decision is computed from each rank's share of the tokens, and ranks that disagree would "
               "run different collectives and hang" if mode in DATA_DEPENDENT_PEERS else
               "the harness has no multi-process check of diffusers' cache hooks")
        raise refuse(f"--context_parallel cannot hold {flag}: {why}. Use a scheduled harness cache (--cache_mode "
                     f"fora, taylor or hicache), or drop --context_parallel")
    if mode in NEEDS_CACHE_CONTEXT and model_family(args.ckpt) == "flux-kontext":
        raise refuse(no_cache_context(mode, "FluxKontextPipeline"))
    values = peer_config_values(args)
    if mode == "diffusers_magcache" and "mag_ratios" not in values and not values.get("calibrate") and \
            model_family(args.ckpt) == "qwen-image":
        raise refuse(f"{flag} needs magnitude ratios calibrated for the model: diffusers ships FLUX's "
                     f"(FLUX_MAG_RATIOS) only. For Qwen-Image give mag_ratios in --peer_cache_config (a run with "
                     f"`calibrate: true` in that file prints them)")


def no_cache_context(mode: str, pipeline_class: str) -> str:
    import diffusers

    return (f"--cache_mode {mode} cannot run with {pipeline_class}: diffusers' {PEER_SPECS[mode].config_class} keeps "
            f"its state per `transformer.cache_context(...)`, and diffusers {diffusers.__version__}'s "
            f"{pipeline_class} calls its transformer outside any. Use diffusers_magcache, diffusers_pab, "
            f"diffusers_fastercache, cache-dit or a harness cache (fora, taylor, hicache, fbcache)")


def calls_transformer_in_cache_context(pipeline) -> bool:
    import inspect

    try:
        return "cache_context(" in inspect.getsource(type(pipeline).__call__)
    except (OSError, TypeError):  # no source to read: let diffusers say it
        return True


def build_peer_config(pipeline, args: argparse.Namespace):
    """The diffusers config object for args.cache_mode, for this pipeline."""
    mode = args.cache_mode
    values = peer_config_values(args)
    weight = values.pop("attention_weight", None)
    cls = config_class(mode)
    if mode == "diffusers_magcache" and "mag_ratios" not in values and not values.get("calibrate"):
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        if type(pipeline.transformer).__name__ != "FluxTransformer2DModel":
            raise StackError(f"--cache_mode {mode}: diffusers ships MagCache ratios for FLUX only; give mag_ratios in "
                             f"--peer_cache_config for {type(pipeline.transformer).__name__}")
        values["mag_ratios"] = FLUX_MAG_RATIOS.clone()
    if mode in ("diffusers_fastercache", "diffusers_pab"):
        values["current_timestep_callback"] = lambda: pipeline.current_timestep
    if mode == "diffusers_fastercache":
        weight = 0.5 if weight is None else weight  # diffusers' default weight, said explicitly (no warning)
        values["attention_weight_callback"] = lambda _module: weight
    return cls(**values)


def describe_config(config) -> str:
    shown = []
    for field in dataclasses.fields(config):
        if field.name.startswith("_") or field.name.endswith("_callback") or field.name.endswith("identifiers"):
            continue
        value = getattr(config, field.name)
        if field.name == "mag_ratios" and value is not None:
            value = f"<{len(value)} ratios>"
        elif isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        shown.append(f"{field.name}={value}")
    return f"{type(config).__name__}({', '.join(shown)})"


def apply_peer_cache(pipeline, args: argparse.Namespace) -> str:
    """Attach the diffusers cache of args.cache_mode with diffusers' `enable_cache`; returns the stack's status line."""
    import diffusers

    transformer = pipeline.transformer
    if not hasattr(transformer, "enable_cache"):
        raise StackError(f"--cache_mode {args.cache_mode}: {type(transformer).__name__} has no diffusers cache support "
                         f"(CacheMixin.enable_cache)")
    if args.cache_mode in NEEDS_CACHE_CONTEXT and not calls_transformer_in_cache_context(pipeline):
        raise LibraryLimitation(no_cache_context(args.cache_mode, type(pipeline).__name__))
    config = build_peer_config(pipeline, args)
    transformer.enable_cache(config)
    probe = PeerCacheProbe(pipeline, args.cache_mode, config)
    if not probe.hooked:
        raise StackError(f"--cache_mode {args.cache_mode}: diffusers attached {type(config).__name__} to no module of "
                         f"{type(transformer).__name__}")
    transformer.harness_cache = probe
    return (f"applied: diffusers {diffusers.__version__} {describe_config(config)} on {len(probe.hooked)} modules "
            f"(transformer.enable_cache)")


# --- counting what ran --------------------------------------------------------------------------------

def _shape_key(kwargs: dict[str, Any]) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor))


class StepProbe:
    """Transformer-level hooks that record each step's kind (full, or which cached kind) and count FLOPs per kind, in
    the first generation of each schedule (eagerly: compiled kernels bypass FlopCounterMode). Subclasses say what a
    step's kind is. `stats()` reports like HarnessCache.stats()."""

    data_dependent = False
    flops_unavailable: str | None = None  # why FLOPs cannot be counted for this cache (None: they are)

    def __init__(self, pipeline, mode: str):
        self.pipeline, self.transformer, self.mode = pipeline, pipeline.transformer, mode
        self.clock = StepClock(pipeline.scheduler)
        self.generation_index = -1
        self.counting_generation = False
        self.schedules: dict[tuple, list] = {}  # (timesteps, shapes) -> kinds per step, from a counted generation
        self.counted_shapes: set[tuple] = set()
        self.flops: dict[tuple, int] = {}  # (shapes, kind) -> FLOPs of a step of that kind
        self.kinds: list = []  # the current (or last) generation's step kinds
        self.shapes: tuple = ()
        self._counter = None
        self.hooks = [self.transformer.register_forward_pre_hook(self._before, with_kwargs=True),
                      self.transformer.register_forward_hook(self._after, with_kwargs=True, always_call=True)]

    # -- subclasses --
    def full_kind(self) -> Any:
        raise NotImplementedError

    def begin_counted_step(self) -> None:
        pass

    def counted_kind(self) -> Any:
        """The kind of a step that just ran under counting."""
        raise NotImplementedError

    def library_kind(self) -> Any:
        """A data-dependent peer's kind of the step that just ran, from the library's state (None: known later)."""
        raise NotImplementedError

    def end_generation(self) -> None:
        pass

    # -- hooks --
    def _before(self, module, args, kwargs) -> None:
        if self.clock.at_first_step:
            self.generation_index += 1
            self.kinds = []
            self.shapes = _shape_key(kwargs)
            self.schedule_key = (tuple(self.pipeline.scheduler.timesteps.tolist()), self.shapes)
            self.counting_generation = (self.shapes not in self.counted_shapes if self.data_dependent
                                        else self.schedule_key not in self.schedules)
        if self.counting_generation:
            self.begin_counted_step()
            if self.flops_unavailable:
                self._counter = (None, None)
                return
            stance = torch.compiler.set_stance("force_eager")  # compiled kernels would bypass the counter
            counter = FlopCounterMode(display=False)
            stance.__enter__()
            counter.__enter__()
            self._counter = (counter, stance)

    def _after(self, module, args, kwargs, output) -> None:
        step = self.clock.step
        if self._counter is not None:
            counter, stance = self._counter
            if counter is not None:
                counter.__exit__(None, None, None)
                stance.__exit__(None, None, None)
            self._counter = None
            kind = self.counted_kind()
            self.kinds.append(kind)
            self._step_flops = getattr(self, "_step_flops", [])
            if counter is None:
                pass
            elif kind is not None:
                self.flops.setdefault((self.shapes, kind), counter.get_total_flops())
            else:  # known at the generation's end (cache-dit)
                self._step_flops.append((step, counter.get_total_flops()))
            if not self.data_dependent:
                self.schedules[self.schedule_key] = list(self.kinds)
        elif self.data_dependent:
            self.kinds.append(self.library_kind())
        else:
            schedule = self.schedules[self.schedule_key]
            self.kinds.append(schedule[step] if step < len(schedule) else None)
        if step == self.clock.num_steps - 1:
            self.end_generation()
            if self.counting_generation and self.data_dependent:
                self.counted_shapes.add(self.shapes)

    # -- reporting --
    def is_full(self, kind) -> bool:
        return kind == self.full_kind()

    def stats(self) -> dict[str, Any]:
        kinds = self.kinds
        full = sum(1 for k in kinds if self.is_full(k))
        flops_full = self.flops.get((self.shapes, self.full_kind()))
        per_step = [self.flops.get((self.shapes, k)) for k in kinds]
        note = self.flops_unavailable
        if note is not None:
            pass
        elif flops_full is None:
            note = "no full step was counted at these shapes"
        elif any(f is None for f in per_step):
            missing = sorted({str(k) for k, f in zip(kinds, per_step) if f is None})
            note = (f"step kind(s) {', '.join(missing)} did not occur in the generation whose FLOPs were counted "
                    f"(the first at these shapes)")
        actual = sum(per_step) if note is None else None
        return dict(mode=self.mode, full_steps=full, forecast_steps=len(kinds) - full,
                    step_kinds="".join("F" if self.is_full(k) else "c" for k in kinds),
                    flops_full_step=flops_full,
                    flops_per_step_kind={str(k): v for (shapes, k), v in self.flops.items() if shapes == self.shapes},
                    flops_speedup=(flops_full * len(kinds) / actual) if actual else None,
                    flops_note=note, cache_memory_bytes=None, **self.extra_stats())

    def extra_stats(self) -> dict[str, Any]:
        return {}

    def graph_kinds(self):
        raise StackError(f"--cache_mode {self.mode} decides each step in Python, which a recorded CUDA graph cannot "
                         f"replay: use --compile_mode default")


class PeerCacheProbe(StepProbe):
    """A diffusers cache's steps: the kind of a step is how many hooked modules ran their original forward."""

    def __init__(self, pipeline, mode: str, config):
        self.config = config
        self.data_dependent = mode in DATA_DEPENDENT_PEERS
        self.counting = False
        self.calls = 0
        self.hooked: list[tuple[str, torch.nn.Module, Any]] = []
        self.leader = None
        for name, module in pipeline.transformer.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or module is pipeline.transformer:
                continue
            for hook_name, hook in registry.hooks.items():
                if hook_name in CACHE_HOOK_NAMES and hook.fn_ref is not None and hook.fn_ref.original_forward:
                    self._count_calls(hook.fn_ref)
                    self.hooked.append((name, module, hook))
                    if hook_name == PEER_SPECS[mode].leader_hook:
                        self.leader = hook
        super().__init__(pipeline, mode)

    def _count_calls(self, fn_ref) -> None:
        original, probe = fn_ref.original_forward, self

        @functools.wraps(original)
        def original_forward(*args, **kwargs):
            if probe.counting:  # False outside counted generations: compiled code guards on it once
                probe.calls += 1
            return original(*args, **kwargs)

        fn_ref.original_forward = original_forward

    def full_kind(self) -> int:
        return len(self.hooked)

    def begin_counted_step(self) -> None:
        self.calls, self.counting = 0, True

    def counted_kind(self) -> int:
        self.counting = False
        return self.calls

    def library_kind(self) -> int:
        state = self.leader.state_manager.get_state()  # inside the pipeline's cache_context: the call's state
        if state.should_compute:
            return len(self.hooked)
        return 1 if self.mode == "diffusers_fbc" else 0  # FBC always runs its first block; MagCache none

    def is_full(self, kind) -> bool:
        return kind == len(self.hooked)

    def extra_stats(self) -> dict[str, Any]:
        return dict(hooked_modules=len(self.hooked), computed_modules_per_step=list(self.kinds),
                    peer_config=describe_config(self.config))

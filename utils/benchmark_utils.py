"""The shared command line, timing helpers and benchmark records.

Flag names follow flux-fast (`--ckpt`, `--disable_fa3`, `--compile_export_mode`, ...), so that a
flux-fast user feels at home; new layers (Chipmunk, feature caching) follow the same `--disable_*`
pattern.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

# Feature-cache choices: the harness's own (utils/caching.py), cache-dit's DBCache (a YAML file), and the caches of
# diffusers' hooks applied through diffusers itself (utils/peer_caches.py).
PEER_CACHE_MODES = ("diffusers_fbc", "diffusers_taylorseer", "diffusers_taylorseer_lite", "diffusers_magcache",
                    "diffusers_fastercache", "diffusers_pab")
CACHE_MODES = ("none", "fora", "taylor", "hicache", "fbcache", "cache_dit", *PEER_CACHE_MODES)
# The caches that decide from the data (a residual or magnitude test each step): no CUDA graph can replay their
# decision, and under context parallelism each rank would decide from its own share of the tokens.
DATA_DEPENDENT_CACHES = ("fbcache", "cache_dit", "diffusers_fbc", "diffusers_magcache")
# --preset NAME: a set of flags the preset makes the defaults (a flag given beside it still wins; a switch it turns
# on stays on). "fastest" is the fastest measured 50-step FLUX.1-dev stack (docs/RESULTS.md): HiCache N=7 (9 full
# steps of 50) with each window's forecasts in one pass + FA3 fp8 attention + float8 + regional torch.compile with
# one CUDA graph per step kind. Inductor's tuning flags stay off: with them the cold compile of this stack runs for
# many minutes.
PRESETS = {
    "fastest": {"fa3_fp8": True, "cache_mode": "hicache", "interval": 7, "forecast_window": True,
                "compile_export_mode": "compile",
                "compile_scope": "regional", "compile_mode": "reduce-overhead", "disable_inductor_tuning_flags": True},
}


def create_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(formatter_class=HelpFormatter)
    io = parser.add_argument_group("model and sampling")
    io.add_argument("--ckpt", default="black-forest-labs/FLUX.1-schnell",
                    help="Hugging Face id or local dir (FLUX.1-dev/-schnell/-Kontext-dev, Qwen-Image), 'tiny' "
                         "(embedded miniature FLUX, random init, CPU-fast; 'tiny:flux-kontext' and 'tiny:qwen-image' "
                         "the same for Kontext and Qwen-Image), or 'random:flux-dev' / 'random:flux-schnell' / "
                         "'random:flux-kontext' / 'random:qwen-image' (full-size architecture with random weights, "
                         "for timing)")
    io.add_argument("--prompt", default="A cat playing with a ball of yarn", help="the text prompt")
    io.add_argument("--image", default=None, help="input image (a file or an http(s) URL) for FLUX.1-Kontext-dev")
    io.add_argument("--height", type=int, default=None, help="default 1024 (64 for tiny)")
    io.add_argument("--width", type=int, default=None, help="default 1024 (64 for tiny)")
    io.add_argument("--num_inference_steps", type=int_at_least(1), default=None,
                    help="default 28 (dev/kontext), 4 (schnell/tiny), 50 (qwen-image)")
    io.add_argument("--guidance_scale", type=float, default=None,
                    help="default 3.5 (dev/tiny), 0.0 (schnell), 2.5 (kontext); Qwen-Image takes none (it is not "
                         "guidance-distilled, and the harness runs it without true CFG)")
    io.add_argument("--max_sequence_length", type=int_at_least(1, most=512), default=None,
                    help="T5 tokens, at most 512; default 512 (256 schnell, 32 tiny)")
    io.add_argument("--seed", type=int, default=42, help="seed of the initial noise (torch.manual_seed)")
    io.add_argument("--device", default=None, help="default cuda when available, else cpu")
    io.add_argument("--output-file", dest="output_file", default="output.png",
                    help="where gen_image.py saves the image (.png keeps the settings as text chunks); its folder "
                         "must exist")
    io.add_argument("--trace-file", dest="trace_file", default=None, help="write a Chrome trace (.json or .json.gz)")

    stack = parser.add_argument_group("optimization stack (every layer is on by default, as in flux-fast)")
    stack.add_argument("--preset", choices=tuple(PRESETS), default=None,
                       help="a named set of stack flags, overridable flag by flag: " + "; ".join(
                           f"{name} = " + " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in flags.items())
                           for name, flags in PRESETS.items()))
    stack.add_argument("--disable_bf16", action="store_true", help="load in float32 instead of bfloat16")
    stack.add_argument("--disable_fused_projections", action="store_true", help="no QKV fusion")
    stack.add_argument("--disable_fa3", action="store_true", help="keep diffusers' default attention (SDPA)")
    stack.add_argument("--fa3_fp8", action="store_true",
                       help="FA3 on float8 e4m3 q/k/v (relative error 5.3e-2 vs 2.3e-3 in bf16, measured; see README)")
    stack.add_argument("--disable_chipmunk", action="store_true", help="no Chipmunk sparsity even with --chipmunk_config")
    stack.add_argument("--chipmunk_config", default=None, help="Chipmunk YAML (see configs/chipmunk-flux.yml)")
    stack.add_argument("--cache_mode", choices=CACHE_MODES, default="none",
                       help="feature caching method: the harness's own (fora, taylor, hicache, fbcache), cache-dit "
                            "(--cache_dit_config), or a diffusers hook applied by diffusers (diffusers_*: "
                            "utils/peer_caches.py; parameters from --peer_cache_config and the flags below)")
    stack.add_argument("--disable_cache", action="store_true", help="no feature caching, whatever --cache_mode says")
    stack.add_argument("--interval", type=int, default=5, help="full step every N steps (fora/taylor/hicache)")
    stack.add_argument("--max_order", type=int, default=2, help="finite-difference order (taylor/hicache)")
    stack.add_argument("--first_enhance", type=int, default=3, help="leading full steps (fora/taylor/hicache)")
    stack.add_argument("--hicache_scale", type=float, default=0.6, help="HiCache's Hermite dual scaling sigma")
    stack.add_argument("--fbcache_threshold", type=float, default=0.08, help="FBCache relative residual threshold")
    stack.add_argument("--fbcache_taylor", action="store_true", help="forecast FBCache's residual with Taylor")
    stack.add_argument("--forecast_window", action="store_true",
                       help="fora/taylor/hicache on FLUX: compute every forecast up to the next full step in one pass "
                            "over the cache (a Triton kernel) instead of reading the whole cache at every forecast "
                            "step (a forecast 2.7 -> 0.5 ms on an H100 at 1024x1024); on in --preset fastest")
    stack.add_argument("--cache_dit_config", default=None, help="cache-dit YAML (implies --cache_mode cache_dit)")
    stack.add_argument("--peer_cache_config", default=None,
                       help="YAML of the diffusers cache config's fields for a diffusers_* --cache_mode (see "
                            "configs/peer_caches/); --interval, --max_order, --first_enhance and --fbcache_threshold "
                            "fill the fields they name where the YAML does not")
    stack.add_argument("--disable_quant", action="store_true", help="no torchao float8 quantization")
    stack.add_argument("--quant_granularity", choices=("tensor", "row"), default="row",
                       help="float8 scaling granularity; per-row measured faster on H100 (FLUX MLP 0.70 ms "
                            "vs 0.84 per-tensor, 1.01 bf16; docs/RESULTS.md)")
    stack.add_argument("--disable_inductor_tuning_flags", action="store_true",
                       help="keep inductor's default config: no flux-fast tuning flags, MLP GELU left as it is (both "
                            "only matter to compiled code)")
    stack.add_argument("--compile_export_mode", choices=("compile", "export_aoti", "disabled"), default=None,
                       help="torch.compile, torch.export + AOTInductor + CUDA graphs, or eager; default "
                            "export_aoti on CUDA (compile with feature caching), disabled on CPU")
    stack.add_argument("--compile_scope", choices=("full", "regional"), default=None,
                       help="compile (or export) the whole transformer, or only its repeated blocks (much faster "
                            "cold start; export_aoti builds one package per block kind); "
                            "default regional for export_aoti, and when feature caching or Chipmunk is on (their "
                            "per-step decisions stay in Python, between compiled blocks); full otherwise")
    stack.add_argument("--compile_mode", default="default",
                       choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                       help="torch.compile mode. 'reduce-overhead' and 'max-autotune' replay CUDA graphs (no per-kernel "
                            "launch cost; with Chipmunk or a scheduled feature cache (fora, taylor, hicache) one graph "
                            "per step kind; CUDA only; not with fbcache or cache_dit). 'max-autotune' variants "
                            "autotune every GEMM shape: measured ~85-105 s per float8 shape on an H200, many "
                            "minutes cold for FLUX")
    stack.add_argument("--disable_vae_compile", action="store_true",
                       help="with --compile_export_mode compile: keep the VAE decoder eager (by default it is "
                            "compiled, in channels_last, and the PIL image's pixels are made on the device)")
    stack.add_argument("--disable_text_encoder_compile", action="store_true",
                       help="with --compile_export_mode compile: keep FLUX's CLIP and T5 text encoders eager (by "
                            "default their layers are compiled)")
    stack.add_argument("--text_encoder_graphs", action="store_true",
                       help="with --compile_mode reduce-overhead on CUDA: record the compiled CLIP and T5 encoders' "
                            "layers as CUDA graphs too, one per prompt shape (replayed, an encoder's layers are one "
                            "launch and the host draws the initial noise while the device encodes)")
    stack.add_argument("--context_parallel", choices=("none", "ulysses", "ring"), default="none",
                       help="split one image's tokens over the processes of a torchrun launch (degree = world size) "
                            "through diffusers' context parallelism: ulysses (all-to-all to a head split; heads must "
                            "divide by the degree) or ring (key/value chunks merged by log-sum-exp); "
                            "see utils/parallel.py")
    stack.add_argument("--cache-dir", dest="cache_dir", default=os.path.expanduser("~/.cache/flux-harness"),
                       help="where export_aoti keeps its compiled packages")
    stack.add_argument("--use-cached-model", dest="use_cached_model", action="store_true",
                       help="export_aoti: require a matching cached package (error instead of compiling)")

    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--num_runs", type=int_at_least(1), default=10, help="timed generations (run_benchmark.py)")
    bench.add_argument("--warmup_runs", type=int_at_least(0), default=2,
                       help="untimed generations before timing (compilation, caches)")
    bench.add_argument("--results_dir", default="runs",
                       help="where run_benchmark.py writes its record and appends its row to benchmarks.md")
    bench.add_argument("--check", choices=("interval1", "graphs"), default=None,
                       help="instead of timing: run a correctness check (interval1: dense/Chipmunk x HiCache "
                            "interval=1 three-way check, utils/interval1_check.py; graphs: the step graphs of "
                            "--compile_mode reduce-overhead against the same compiled stack run eagerly, "
                            "utils/graphs_check.py); exits 1 on failure")
    bench.add_argument("--check_tolerance", type=float, default=None,
                       help="interval1: max relative latent error of D (Chipmunk+HiCache) vs C (Chipmunk); default 1e-3")
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless the help text gives it already, the default is None (resolved later, see
    resolved_defaults) or the flag is a switch (off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "default" in text:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An error is one line: `PROG: error: MESSAGE` (the usage of every flag is what --help is for)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        """With --preset NAME, its flags start out in the namespace, so argparse leaves them as they are unless
        the command line gives them too."""
        if namespace is None and any(a.dest == "preset" for a in self._actions):
            first = argparse.ArgumentParser(add_help=False)
            first.add_argument("--preset")  # its choices are checked by the full parse
            name = first.parse_known_args(args)[0].preset
            namespace = argparse.Namespace(**PRESETS.get(name, {}))
        return super().parse_known_args(args, namespace)


def int_at_least(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= least (and <= most)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < least or (most is not None and value > most):
            bound = f">= {least}" if most is None else f"from {least} to {most}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound} (got {value})")
        return value
    return parse


# --- checks of the flags alone, made before the heavy imports ----------------------------------------

TINY_CKPTS = ("tiny", "tiny:flux-kontext", "tiny:qwen-image")
RANDOM_CKPTS = ("random:flux-dev", "random:flux-schnell", "random:flux-kontext", "random:qwen-image")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # NAME or ORG/NAME


def check_ckpt(value: str) -> None:
    """Refuse a --ckpt that cannot load anywhere, saying why (ValueError). Accepted: TINY_CKPTS, RANDOM_CKPTS, a
    diffusers pipeline folder (with model_index.json), or a Hugging Face id (looked up when the pipeline loads).
    A value that starts with /, ./, ../ or ~, or has more than one /, is a path and must exist; ORG/NAME is a
    folder when one of that name exists here, a Hugging Face id otherwise."""
    if value in TINY_CKPTS or value in RANDOM_CKPTS:
        return
    if value.startswith("random:"):
        raise ValueError(f"--ckpt {value}: unknown random architecture; use one of {', '.join(RANDOM_CKPTS)}")
    if value.startswith("tiny:"):
        raise ValueError(f"--ckpt {value}: unknown tiny pipeline; use one of {', '.join(TINY_CKPTS)}")
    path = Path(value).expanduser()
    path_like = (value.startswith(("/", "./", "../", "~")) or value in (".", "..") or value.count("/") > 1
                 or (os.sep != "/" and os.sep in value))
    if path_like or path.is_dir():
        if not path.exists():
            raise ValueError(f"--ckpt {value}: no such folder (a local checkpoint is the folder `hf download` or "
                             f"save_pretrained() writes)")
        if not path.is_dir():
            raise ValueError(f"--ckpt {value}: a file, not a pipeline folder (the folder that holds model_index.json)")
        if not (path / "model_index.json").is_file():
            raise ValueError(f"--ckpt {value}: not a diffusers pipeline folder (no model_index.json in it)")
        return
    if not HUB_ID.fullmatch(value):
        raise ValueError(f"--ckpt {value!r}: not 'tiny', {', '.join(RANDOM_CKPTS)}, a local folder or a Hugging "
                         f"Face id (ORG/NAME, e.g. black-forest-labs/FLUX.1-dev)")


def hub_download_hint(ckpt: str) -> str:
    """What to do when a Hugging Face checkpoint is not available here (the CLI of huggingface-hub is `hf`)."""
    name = ckpt.rstrip("/").split("/")[-1]
    return (f"The weights of {ckpt!r} are not in the local Hugging Face cache, and there is no folder of that name "
            f"here. On a machine with internet, run\n"
            f"    hf download {ckpt} --local-dir /path/to/{name}\n"
            f"(FLUX.1-dev and Kontext are gated: run `hf auth login` first and accept the licence on the model's "
            f"page), copy the folder to this machine and pass --ckpt /path/to/{name}; or point HF_HOME at a filled "
            f"Hugging Face cache.")


@functools.lru_cache(maxsize=None)
def model_family(ckpt: str) -> str:
    """'flux', 'flux-kontext' or 'qwen-image': the pipeline a --ckpt value loads. A local pipeline folder says so in
    its model_index.json; a Hugging Face id or the embedded pipelines by their name."""
    index = Path(ckpt).expanduser() / "model_index.json"
    if index.is_file():
        try:
            name = str(json.loads(index.read_text()).get("_class_name", ""))
        except (OSError, ValueError):
            name = ""
        if name:
            return "qwen-image" if name.startswith("QwenImage") else ("flux-kontext" if "Kontext" in name else "flux")
    lowered = ckpt.lower()
    if "qwen" in lowered:
        return "qwen-image"
    return "flux-kontext" if "kontext" in lowered else "flux"


def is_tiny(ckpt: str) -> bool:
    return ckpt in TINY_CKPTS


def check_input_image(args: argparse.Namespace, sweep_images: bool = False) -> None:
    """FLUX.1-Kontext edits an image (--image, a file or an http(s) URL); the other pipelines take none.
    `sweep_images`: a sweep gives the input images (its config checks them)."""
    family = model_family(args.ckpt)
    image = getattr(args, "image", None)
    if family == "flux-kontext":
        if not image and sweep_images:
            return
        if not image:
            raise ValueError("FLUX.1-Kontext-dev edits an image: pass --image PATH_OR_URL")
        if not image.startswith(("http://", "https://")) and not Path(image).is_file():
            raise ValueError(f"--image {image}: no such file")
    elif image:
        raise ValueError(f"--image is for FLUX.1-Kontext (--ckpt black-forest-labs/FLUX.1-Kontext-dev, "
                         f"random:flux-kontext or tiny:flux-kontext); {args.ckpt} generates from the prompt alone: "
                         f"drop --image")


def check_args(args: argparse.Namespace, sweep_images: bool = False) -> None:
    """The refusals that depend on the flags alone (ValueError naming the flag), before diffusers and the stack
    are imported, so that a mistake is reported at once. validate_args() in utils/pipeline_utils.py makes these
    and the ones that depend on the machine. `sweep_images`: a sweep gives Kontext's input images."""
    check_ckpt(args.ckpt)
    if min(args.height, args.width) < 16 or args.height % 16 or args.width % 16:
        raise ValueError(f"--height/--width must be positive multiples of 16 for FLUX (got {args.height}x{args.width})")
    for flag in ("chipmunk_config", "cache_dit_config", "peer_cache_config"):
        path = getattr(args, flag, None)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{flag} {path}: no such file")
    if getattr(args, "peer_cache_config", None) and args.cache_mode not in PEER_CACHE_MODES:
        raise ValueError(f"--peer_cache_config configures a diffusers cache: pass --cache_mode with one of "
                         f"{', '.join(PEER_CACHE_MODES)} (got --cache_mode {args.cache_mode})")
    check_input_image(args, sweep_images)
    if args.cache_mode != "none" and not args.disable_cache:
        for flag, least in (("interval", 1), ("max_order", 0), ("first_enhance", 0)):
            if getattr(args, flag) < least:
                raise ValueError(f"--{flag} must be >= {least} (got {getattr(args, flag)})")


def transformer_flops(pipeline, args: argparse.Namespace) -> int:
    """FLOPs of one eager transformer forward at the benchmark's shapes (before the stack is applied). Qwen-Image's
    text sequence is as long as the prompt (FLUX pads to --max_sequence_length): counted at --prompt's length."""
    from torch.utils.flop_counter import FlopCounterMode

    from utils import compile_utils

    text_tokens = args.max_sequence_length
    if type(pipeline.transformer).__name__ == "QwenImageTransformer2DModel":
        with torch.no_grad():
            embeds, _ = pipeline.encode_prompt(args.prompt, device=pipeline.transformer.device,
                                               max_sequence_length=args.max_sequence_length)
        text_tokens = embeds.shape[1]
    example = compile_utils.transformer_example_kwargs(pipeline, args.height, args.width, text_tokens)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipeline.transformer(**example, return_dict=False)
    return counter.get_total_flops()


class _DropNotice(logging.Filter):
    """Drops a logger's records whose format string matches `pattern` and, with `first_arg_module`, whose first
    argument comes from that package."""

    def __init__(self, pattern: str, first_arg_module: str | None = None):
        super().__init__()
        self.pattern, self.first_arg_module = re.compile(pattern), first_arg_module

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.search(str(record.msg)):
            return True
        if self.first_arg_module is None:
            return False
        first = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not getattr(first, "__module__", "").startswith(self.first_arg_module)


# Notices that third-party imports print on every command, about nothing the harness uses. Installed when this
# module is imported: before diffusers and torchao are, for the commands that import this module first.
IMPORT_NOTICES = (
    # torchao registers its Enum classes as pytree constants, which torch now deprecates for Enum subclasses.
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported", "torchao"),
    # diffusers' torchao quantizer lists torchao tensor classes (NF4Tensor, ...) that this torchao no longer
    # exports; they only matter to loading a checkpoint serialized with torchao, and the stack quantizes in process.
    ("diffusers.quantizers.torchao.torchao_quantizer", r"^Unable to import `torchao` Tensor objects", None),
)
for _logger, _pattern, _module in IMPORT_NOTICES:
    logging.getLogger(_logger).addFilter(_DropNotice(_pattern, _module))


def resolved_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on the checkpoint (steps, guidance, size, text length)."""
    ckpt = args.ckpt.lower()
    family = model_family(args.ckpt)
    tiny, schnell = is_tiny(args.ckpt), "schnell" in ckpt
    kontext, qwen = family == "flux-kontext", family == "qwen-image"
    if args.height is None:
        args.height = 64 if tiny else 1024
    if args.width is None:
        args.width = 64 if tiny else 1024
    if args.num_inference_steps is None:
        args.num_inference_steps = 4 if (tiny or schnell) else (50 if qwen else 28)
    if args.guidance_scale is None and not qwen:  # Qwen-Image is not guidance-distilled: it takes none
        args.guidance_scale = 0.0 if schnell else (2.5 if kontext else 3.5)
    if args.max_sequence_length is None:
        args.max_sequence_length = 32 if tiny else (256 if schnell else 512)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cache_dit_config and args.cache_mode == "none":
        args.cache_mode = "cache_dit"
    return args


STACK_FLAGS = ("disable_bf16", "disable_fused_projections", "disable_fa3", "fa3_fp8", "disable_chipmunk",
               "chipmunk_config", "cache_mode", "disable_cache", "interval", "max_order", "first_enhance",
               "hicache_scale", "fbcache_threshold", "fbcache_taylor", "forecast_window", "cache_dit_config",
               "peer_cache_config", "disable_quant", "quant_granularity", "disable_inductor_tuning_flags",
               "compile_export_mode", "compile_scope", "compile_mode", "disable_vae_compile",
               "disable_text_encoder_compile", "text_encoder_graphs")
WHEN_GIVEN = ("peer_cache_config", "forecast_window", "disable_vae_compile", "disable_text_encoder_compile",
              "text_encoder_graphs")


def stack_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that shape the stack; those of WHEN_GIVEN only when given: these flags key export_aoti's cached
    packages, which a flag that export never reads must not rebuild."""
    return {k: getattr(args, k) for k in STACK_FLAGS if hasattr(args, k) and (k not in WHEN_GIVEN or getattr(args, k))}


def pipeline_call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call's arguments from the flags. FLUX.1-Kontext also gets its input image (--image, read once
    per path) and `max_area` of the requested size (its pipeline would otherwise resize the output to 1024^2 pixels
    of the same aspect ratio); the tiny Kontext pipeline keeps its input image's size (`_auto_resize=False`: the
    resolutions Kontext was trained on are 672 px and up, far beyond a 64 px miniature). Qwen-Image takes no
    guidance scale and runs without true CFG (`true_cfg_scale=1`: one transformer call per step)."""
    kwargs = dict(prompt=args.prompt, height=args.height, width=args.width,
                  num_inference_steps=args.num_inference_steps, max_sequence_length=args.max_sequence_length)
    family = model_family(args.ckpt)
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if family == "qwen-image":
        kwargs["true_cfg_scale"] = 1.0  # one transformer call per step (feature caching refuses two)
    if family == "flux-kontext":
        kwargs.update(max_area=args.height * args.width, _auto_resize=not is_tiny(args.ckpt))
        if getattr(args, "image", None):
            kwargs["image"] = load_input_image(args.image)
    return kwargs


@functools.lru_cache(maxsize=64)  # an editing sweep over many images: the memory stays bounded
def load_input_image(path_or_url: str):
    """An input image as RGB PIL, read once per path or URL (diffusers' load_image)."""
    from diffusers.utils import load_image

    return load_image(path_or_url)


def set_rand_seeds(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


# --- profiling labels -----------------------------------------------------------------------------

@contextmanager
def annotate_pipeline(pipeline):
    """Label the pipeline's stages for the profiler and for `StageTimer`: prompt encoding, each
    denoising step, VAE decode and post-processing. Wraps the instance's methods; restored on exit."""
    originals = {}

    def wrap(obj, name, label):
        fn = getattr(obj, name)
        # An instance attribute (e.g. export_aoti's installed forward) is put back on exit; a method is uncovered.
        originals[(obj, name)] = vars(obj).get(name)

        def wrapped(*a, **kw):
            with torch.profiler.record_function(label), STAGE_TIMER.stage(label):
                return fn(*a, **kw)
        setattr(obj, name, wrapped)

    wrap(pipeline, "encode_prompt", "prompt_encoding")
    wrap(pipeline.transformer, "forward", "denoising_step")
    wrap(pipeline.vae, "decode", "decoding")
    wrap(pipeline.image_processor, "postprocess", "postprocessing")
    try:
        yield
    finally:
        for (obj, name), original in originals.items():
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)


class StageTimer:
    """Accumulates time per labelled stage; CUDA events on GPU, synchronized wall clock on CPU."""

    def __init__(self):
        self.enabled = False
        self.events: list[tuple[str, Any, Any]] = []

    @contextmanager
    def stage(self, label: str):
        if not self.enabled:
            yield
            return
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.events.append((label, start, end))

    def collect(self) -> dict[str, list[float]]:
        """Seconds per stage call, grouped by label (synchronizes once)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        out: dict[str, list[float]] = {}
        for label, start, end in self.events:
            sec = start.elapsed_time(end) / 1e3 if hasattr(start, "elapsed_time") else end - start
            out.setdefault(label, []).append(sec)
        self.events.clear()
        return out


STAGE_TIMER = StageTimer()


def time_call(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds taken by `fn()`: CUDA events on GPU, synchronized wall clock otherwise."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def kernel_kind(name: str) -> str:
    """Coarse class of a GPU kernel from its name: where a transformer step's device time goes. Inductor's fused
    kernels first (their names can mention _scaled_mm), then attention (FA3 runs as a cutlass kernel), then GEMMs."""
    lowered = name.lower()
    if lowered.startswith("triton_"):
        return "fused (inductor)"
    if any(key in lowered for key in ("flash", "fmha", "sdpa", "attention", "attn")):
        return "attention"
    if any(key in lowered for key in ("gemm", "nvjet", "xmma", "cublas", "cutlass", "scaled_mm", "gemv")):
        return "matmul"
    return "other"


def device_kernel_times(fn: Callable[[], Any], runs: int = 2) -> list[dict[str, Any]]:
    """Self device ms and launches per call of `fn`, for each GPU kernel name, largest first (torch.profiler over
    `runs` calls after the caller's warm-up; kernels replayed from a CUDA graph are listed too). Empty without
    CUDA: there is no device time to split, and `fn` is not run."""
    if not torch.cuda.is_available():
        return []
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    rows = [{"kernel": event.key, "kind": kernel_kind(event.key), "ms": event.self_device_time_total / 1e3 / runs,
             "calls": event.count / runs}
            for event in prof.key_averages()
            if str(event.device_type).endswith("CUDA") and event.self_device_time_total]
    return sorted(rows, key=lambda row: -row["ms"])


def ms_by_kind(kernels: list[dict[str, Any]]) -> dict[str, float]:
    """device_kernel_times' rows summed by kernel_kind, largest first."""
    totals: dict[str, float] = {}
    for row in kernels:
        totals[row["kind"]] = totals.get(row["kind"], 0.0) + row["ms"]
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# --- records ---------------------------------------------------------------------------------------

def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment_record(device: str) -> dict[str, Any]:
    """What hardware and software made a record."""
    from utils.compile_utils import cxx_compiler

    env = {
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "torchao": _version("torchao"),
        "triton": _version("triton"),  # the Chipmunk kernels and inductor's generated code compile with it
        "fa3": _version("fa3-fwd") or _version("flash_attn_3") or _version("flashattn-hopper"),
        "cache_dit": _version("cache-dit"),
        # export_aoti's .so files are built with it ($CXX): /opt/gcc/bin/g++ has built ones that crashed
        "cxx": cxx_compiler(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if env["gpu"]:
        env["cudnn"] = torch.backends.cudnn.version()
        # The clock limit and power cap: a power-capped GPU runs the same kernels slower when kept busy (CUDA graphs).
        env["gpu_max_sm_clock_mhz"], env["gpu_power_limit_w"] = _nvidia_smi("clocks.max.sm", "power.limit")
    return env


def _nvidia_smi(*fields: str) -> list[str | None]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                              f"--id={torch.cuda.current_device()}"], capture_output=True, text=True, timeout=10)
        values = [v.strip() for v in out.stdout.splitlines()[0].split(",")]
        return values if out.returncode == 0 and len(values) == len(fields) else [None] * len(fields)
    except (OSError, IndexError, RuntimeError, subprocess.SubprocessError):  # no tool, no GPU, a timeout
        return [None] * len(fields)


def cpu_model() -> str:
    """The host CPU's model name: host-bound step times (eager launches, Python between compiled blocks) depend on
    it, and machines of one GPU kind differ in it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(argv: list[str] | None = None, script: str | None = None) -> str:
    """The command that made a record: this process's, or `script` with `argv` when called as a function."""
    if argv is None:
        script, argv = Path(sys.argv[0]).name, sys.argv[1:]
    return " ".join(shlex.quote(a) for a in [script or Path(sys.argv[0]).name, *argv])


def write_record(record: dict[str, Any], results_dir: str | Path, name: str, table_row: dict[str, Any]) -> Path:
    """Write `<name>.json` and append one row to `<results_dir>/benchmarks.md` (header on first write)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
    table = results_dir / "benchmarks.md"
    if not table.exists():
        table.write_text("| " + " | ".join(table_row) + " |\n|" + "---|" * len(table_row) + "\n")
    with table.open("a") as f:
        f.write("| " + " | ".join(str(v) for v in table_row.values()) + " |\n")
    return path


def write_check_record(kind: str, args: argparse.Namespace, fields: dict[str, Any], title: str,
                       body: str) -> Path:
    """A correctness check's record (`run_benchmark.py --check ...`): `<results_dir>/<kind>_<ckpt>_<size>_<steps>
    steps_<time>.json` with the command, environment and shapes beside `fields`, and a markdown page `title` +
    `body`. Returns the JSON path."""
    env = environment_record(args.device)
    record = {"kind": f"{kind}_check", "command": command_line(), "environment": env, "ckpt": args.ckpt,
              "shapes": {"height": args.height, "width": args.width, "steps": args.num_inference_steps}, **fields}
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{kind}_{args.ckpt}_{args.height}x{args.width}_"
                                            f"{args.num_inference_steps}steps_{env['timestamp_utc']}")
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    (out / f"{name}.md").write_text(f"# {title}\n\n`{record['command']}`\n\n{body}\n")
    return out / f"{name}.json"

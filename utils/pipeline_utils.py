"""Load a FLUX pipeline and apply the optimization stack.

`optimize()` reads top to bottom in the order the layers apply:
  1. QKV fusion  2. attention (FA3 bf16/fp8)  3. Chipmunk sparsity  4. feature caching
  5. float8 quantization (torchao)  6. inductor flags  7. context parallelism (diffusers; utils/parallel.py)
  8. torch.compile | export + AOTInductor + CUDA graphs
Each layer prints one line: applied, skipped (by flag) or unavailable (and why).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from utils.benchmark_utils import (DATA_DEPENDENT_CACHES, PEER_CACHE_MODES, check_ckpt, hub_download_hint, is_tiny, model_family,  # noqa: I001
                                   stack_flags)  # before diffusers: filters its notices
from utils.errors import StackError
from diffusers import DiffusionPipeline, FluxKontextPipeline, FluxPipeline, QwenImagePipeline
from utils import compile_utils


# --- loading ---------------------------------------------------------------------------------------

def load_pipeline(args: argparse.Namespace) -> DiffusionPipeline:
    """`--ckpt`: a Hugging Face id or local dir, 'tiny' / 'tiny:flux-kontext' / 'tiny:qwen-image', or
    'random:flux-dev' / 'random:flux-schnell' / 'random:flux-kontext' / 'random:qwen-image'."""
    dtype = torch.float32 if args.disable_bf16 else torch.bfloat16
    try:
        check_ckpt(args.ckpt)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.ckpt in ("tiny", "tiny:flux-kontext"):
        from utils.flux_builders import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0, dtype=dtype, kontext=args.ckpt == "tiny:flux-kontext")
    elif args.ckpt == "tiny:qwen-image":
        from utils.flux_builders import build_tiny_qwen_pipeline

        pipe = build_tiny_qwen_pipeline(seed=0, dtype=dtype)
    elif args.ckpt.startswith("random:"):
        from utils.flux_builders import build_random_pipeline

        pipe = build_random_pipeline(args.ckpt.split(":", 1)[1], dtype=dtype, device=args.device)
        print(f"[load] {args.ckpt}: full-size architecture with RANDOM WEIGHTS (timings are real, images are not)")
    else:
        pipe = _from_pretrained(args.ckpt, dtype, args.device)
    pipe.harness_random_weights = is_tiny(args.ckpt) or args.ckpt.startswith("random:")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def _from_pretrained(ckpt: str, dtype: torch.dtype, device: str) -> DiffusionPipeline:
    family = model_family(ckpt)
    cls = {"flux-kontext": FluxKontextPipeline, "qwen-image": QwenImagePipeline}.get(family) or \
        (FluxPipeline if "flux" in ckpt.lower() else DiffusionPipeline)
    # On CPU, memory-mapped safetensors leave weights at unaligned addresses (seen: 40 mod 64), and the
    # CPU GEMM kernels then round differently (~5e-7 in fp32): read them into fresh, aligned memory.
    # On a GPU the weights are copied to device memory anyway.
    kwargs = dict(dtype=dtype, disable_mmap=not device.startswith("cuda"))
    if Path(ckpt).is_dir():
        return cls.from_pretrained(ckpt, **kwargs)
    try:  # never touch the network when the weights are already in the local HF cache
        return cls.from_pretrained(ckpt, local_files_only=True, **kwargs)
    except Exception as local_error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = hub_download_hint(ckpt)
        if offline:
            raise SystemExit(f"error: {hint}\n(local lookup said: {type(local_error).__name__})") from None
    try:
        return cls.from_pretrained(ckpt, **kwargs)
    except Exception as e:
        raise SystemExit(f"error: could not download {ckpt!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}).\n"
                         f"{hint}") from None


def is_schnell(pipeline) -> bool:
    """Timestep-distilled (schnell) FLUX has no guidance embedding."""
    return not pipeline.transformer.config.guidance_embeds


# --- validation ------------------------------------------------------------------------------------

def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve device-dependent defaults and refuse invalid combinations before any work is done."""
    cuda = torch.cuda.is_available() and args.device.startswith("cuda")
    cache_on = args.cache_mode != "none" and not args.disable_cache
    chipmunk_on = args.chipmunk_config is not None and not args.disable_chipmunk

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise StackError("--device cuda was requested but no CUDA device is visible; use --device cpu")
    if getattr(args, "preset", None) and not cuda:
        raise StackError(f"--preset {args.preset} is a Hopper GPU stack (FA3 fp8 attention, CUDA graphs); on CPU "
                         f"drop --preset and pass the flags you want")
    if args.height % 16 or args.width % 16:
        raise StackError(f"--height/--width must be multiples of 16 for FLUX (got {args.height}x{args.width})")
    if args.num_inference_steps < 1:
        raise StackError("--num_inference_steps must be >= 1")
    if args.fa3_fp8 and args.disable_fa3:
        raise StackError("--fa3_fp8 needs FA3: drop --disable_fa3, or drop --fa3_fp8")
    if args.fa3_fp8 and not cuda:
        raise StackError("--fa3_fp8 needs a Hopper GPU (FA3 float8 kernels); drop it on CPU")

    peer_cache = cache_on and args.cache_mode in PEER_CACHE_MODES
    qwen = model_family(args.ckpt) == "qwen-image"
    if qwen:
        validate_qwen_args(args, chipmunk_on)
    if getattr(args, "context_parallel", "none") != "none":  # before the compile defaults: it sets its own
        from utils.parallel import validate_parallel_args

        validate_parallel_args(args)
    if args.compile_export_mode is None:
        if not cuda or (peer_cache and args.cache_mode == "diffusers_magcache"):
            args.compile_export_mode = "disabled"  # MagCache's hooks keep the blocks out of torch.compile
        else:
            args.compile_export_mode = "compile" if (cache_on or chipmunk_on or qwen) else "export_aoti"
        args.compile_export_mode_defaulted = True
    if peer_cache:  # diffusers' cache hooks: their own refusals, with their reasons (utils/peer_caches.py)
        from utils.peer_caches import validate_peer_cache_args

        validate_peer_cache_args(args)
    if args.compile_export_mode == "export_aoti":
        if not cuda:
            raise StackError("--compile_export_mode export_aoti needs CUDA (its CUDA graphs); on CPU use "
                             "--compile_export_mode compile or disabled")
        if cache_on:
            kind = "data-dependent " if args.cache_mode in DATA_DEPENDENT_CACHES else ""
            raise StackError(f"--compile_export_mode export_aoti cannot hold {kind}feature caching "
                             f"(--cache_mode {args.cache_mode}): the exported graph is one fixed full forward. "
                             f"Use --compile_export_mode compile, or --disable_cache")
        if chipmunk_on:
            raise StackError("--compile_export_mode export_aoti cannot hold Chipmunk's per-step sparse state; use "
                             "--compile_export_mode compile, or --disable_chipmunk")
    if args.compile_export_mode == "compile" and args.compile_mode in compile_utils.CUDAGRAPH_MODES:
        if cache_on and args.cache_mode in DATA_DEPENDENT_CACHES:
            raise StackError(f"--compile_mode {args.compile_mode} replays recorded CUDA graphs, which cannot hold "
                             f"--cache_mode {args.cache_mode}'s data-dependent per-step decision: use --compile_mode "
                             f"default (or max-autotune-no-cudagraphs), or a scheduled cache (fora, taylor, hicache)")
        if (chipmunk_on or cache_on) and not cuda:
            raise StackError(f"--compile_mode {args.compile_mode} with Chipmunk or feature caching records one CUDA "
                             f"graph per step kind, which needs a CUDA device: use --compile_mode default on CPU")
    if getattr(args, "text_encoder_graphs", False) and (
            args.compile_export_mode != "compile" or args.compile_mode not in compile_utils.CUDAGRAPH_MODES
            or getattr(args, "disable_text_encoder_compile", False)):
        raise StackError("--text_encoder_graphs records the compiled text encoders as the step is recorded: it needs "
                         "--compile_export_mode compile --compile_mode reduce-overhead, without "
                         "--disable_text_encoder_compile")
    if args.compile_scope is None:
        # export_aoti: one package per block kind. The whole float8 dev transformer had not finished building after
        # 8 minutes on a 16-core H200 host; the regional packages built in 328 + 97 s and run at the same step time.
        args.compile_scope = "regional" if (cache_on or chipmunk_on or args.compile_export_mode == "export_aoti") \
            else "full"
    elif args.compile_scope == "full" and (cache_on or chipmunk_on) and args.compile_export_mode == "compile":
        raise StackError("feature caching and Chipmunk decide per step in Python, which a full-graph compile would "
                         "bake in: use --compile_scope regional (the default with them)")
    if args.use_cached_model and args.compile_export_mode != "export_aoti":
        raise StackError("--use-cached-model only applies to --compile_export_mode export_aoti")
    if args.cache_mode == "cache_dit" and not args.disable_cache and "schnell" in args.ckpt.lower():
        raise StackError("cache-dit is not for FLUX.1-schnell (4 distilled steps leave nothing to cache); "
                         "drop --cache_dit_config")
    if cache_on:  # the caching layer's own checks: values in range, cache-dit YAML and package present
        from utils.caching import validate_cache_args

        validate_cache_args(args)
    if chipmunk_on:
        from utils.chipmunk import load_chipmunk_config

        config = load_chipmunk_config(args.chipmunk_config, height=args.height, width=args.width)
        if config.mlp.is_fp8 and cuda and torch.cuda.get_device_capability() < (8, 9):
            raise StackError(f"{args.chipmunk_config}: mlp.is_fp8 needs float8 matmuls (an sm_89+ GPU: Ada, Hopper); "
                             f"set it to false on this GPU")
    return args


def validate_qwen_args(args: argparse.Namespace, chipmunk_on: bool) -> None:
    """What the Qwen-Image backend cannot run, refused by name. Applied to it: FA3 (its own processor), float8,
    inductor flags, torch.compile (regional or full), the step graphs, the harness's caches on its blocks, cache-dit
    and diffusers' cache hooks (MagCache with ratios of its own)."""
    if chipmunk_on:
        raise StackError("Chipmunk is wired into FLUX's blocks (its single-block module, token reorder of FLUX's "
                         "16-pixel patches); Qwen-Image has none of them: drop --chipmunk_config")
    if args.compile_export_mode == "export_aoti":
        raise StackError("--compile_export_mode export_aoti builds FLUX's block kinds from FLUX's example inputs; for "
                         "Qwen-Image use --compile_export_mode compile (with --compile_mode reduce-overhead for "
                         "CUDA graphs) or disabled")
    if getattr(args, "context_parallel", "none") != "none":
        raise StackError("--context_parallel is wired for FLUX here (token counts, the FA3 processor's collectives); "
                         "drop it for Qwen-Image")
    if args.guidance_scale is not None:
        raise StackError("Qwen-Image is not guidance-distilled and the harness runs it without true CFG: drop "
                         "--guidance_scale")


# --- the stack -------------------------------------------------------------------------------------

def _report(report: dict[str, str], layer: str, status: str) -> None:
    report[layer] = status
    print(f"[stack] {layer:<22} {status}")


def optimize(pipeline: DiffusionPipeline, args: argparse.Namespace) -> DiffusionPipeline:
    """Apply the stack in order; the layer report is kept as `pipeline.harness_stack`."""
    cuda = pipeline.transformer.device.type == "cuda"
    report: dict[str, str] = {}
    transformer = pipeline.transformer
    qwen = type(transformer).__name__ == "QwenImageTransformer2DModel"

    # 1. QKV fusion: one projection matmul instead of three (per stream).
    if args.disable_fused_projections:
        _report(report, "qkv_fusion", "skipped (--disable_fused_projections)")
    elif qwen:
        _report(report, "qkv_fusion", "unavailable (Qwen-Image's attention processor computes q, k and v with "
                                      "separate projections and has no fused path)")
    else:
        transformer.fuse_qkv_projections()
        _report(report, "qkv_fusion", "applied")

    # 2. Attention kernel.
    if args.disable_fa3:
        _report(report, "attention", "skipped (--disable_fa3): diffusers SDPA")
    else:
        from utils.attention import FA3FluxAttnProcessor, FA3QwenAttnProcessor, fa3_unavailable_reason

        reason = fa3_unavailable_reason()
        if reason is None:
            processor = FA3QwenAttnProcessor if qwen else FA3FluxAttnProcessor
            transformer.set_attn_processor(processor(fp8=args.fa3_fp8))
            _report(report, "attention", "applied: FA3 " + ("fp8 e4m3 q/k/v" if args.fa3_fp8 else "bf16"))
        else:
            _report(report, "attention", f"unavailable ({reason}): falling back to SDPA (cuDNN on GPU)")

    # 3. Chipmunk column-sparse deltas.
    if args.chipmunk_config is None or args.disable_chipmunk:
        _report(report, "chipmunk", "skipped (" + ("--disable_chipmunk" if args.disable_chipmunk else
                                                     "no --chipmunk_config") + ")")
    else:
        from utils.chipmunk import apply_chipmunk

        _report(report, "chipmunk", apply_chipmunk(pipeline, args))

    # 4. Feature caching (TaylorSeer, HiCache, FORA, FBCache; cache-dit's DBCache; diffusers' cache hooks).
    if args.disable_cache or args.cache_mode == "none":
        _report(report, "feature_cache", "skipped (" + ("--disable_cache" if args.disable_cache else
                                                          "--cache_mode none") + ")")
    else:
        from utils.caching import apply_caching

        _report(report, "feature_cache", apply_caching(pipeline, args))

    # 5. float8 weights and dynamic float8 activations in the transformer's linear layers.
    if args.disable_quant:
        _report(report, "float8_quant", "skipped (--disable_quant)")
    elif not cuda or torch.cuda.get_device_capability(transformer.device) < (8, 9):
        _report(report, "float8_quant", "unavailable (float8 matmuls need an sm_89+ GPU)")
    else:
        _report(report, "float8_quant", quantize_float8(transformer, args.quant_granularity))

    # 6. Inductor tuning: flux-fast's flags, and the MLPs' tanh-GELU in a form inductor compiles to cheap code.
    if args.disable_inductor_tuning_flags:
        _report(report, "inductor_flags", "skipped (--disable_inductor_tuning_flags)")
    elif args.compile_export_mode == "disabled":
        _report(report, "inductor_flags", "skipped (eager run: the flags and the GELU form only change compiled code)")
    else:
        flags = compile_utils.set_inductor_tuning_flags()
        status = "applied: " + ", ".join(f"{k}={v}" for k, v in flags.items())
        status += f"; tanh-GELU as x*sigmoid(2u) in {compile_utils.use_sigmoid_gelu(transformer)} MLPs"
        _report(report, "inductor_flags", status)

    # 7. Context parallelism: the tokens split over the ranks of a torchrun launch (diffusers' enable_parallelism).
    if getattr(args, "context_parallel", "none") == "none":
        _report(report, "context_parallel", "skipped (--context_parallel none)")
    else:
        from utils.parallel import apply_context_parallel

        _report(report, "context_parallel", apply_context_parallel(pipeline, args))

    # 8. Compilation.
    mode = args.compile_export_mode
    defaulted = " (default on CPU)" if getattr(args, "compile_export_mode_defaulted", False) and not cuda else ""
    if mode == "disabled":
        _report(report, "compile_export", f"skipped (--compile_export_mode disabled{defaulted}): eager")
    elif mode == "compile" and args.compile_mode in compile_utils.CUDAGRAPH_MODES:
        # Compiled without inductor's CUDA graph trees, then recorded around the whole forward, one graph per step
        # kind (utils/step_graphs.py). Graph trees record each compiled block apart and leave the glue between blocks
        # to the host, which a host slower than the GPU turns into the step time; and they would replay one recorded
        # step whatever Chipmunk's or feature caching's schedule says.
        inductor_mode = compile_utils.WITHOUT_CUDAGRAPHS[args.compile_mode]
        compile_utils.compile_transformer(transformer, args.compile_scope, inductor_mode, forward_only=cuda)
        if cuda:
            from utils.step_graphs import install_step_graphs

            graphs = install_step_graphs(transformer)
        else:
            graphs = "no CUDA graphs (no CUDA device)"
        _report(report, "compile_export", f"applied: torch.compile ({args.compile_scope}, mode={inductor_mode}) + "
                                          f"{graphs}; {decoder_and_encoders(pipeline, args, graphs=cuda)}")
    elif mode == "compile":
        # diffusers' cache hooks decide in torch.compiler.disable'd code or Python branches: graph breaks there
        peer = args.cache_mode in PEER_CACHE_MODES and not args.disable_cache
        compile_utils.compile_transformer(transformer, args.compile_scope, args.compile_mode, fullgraph=not peer)
        breaks = ", fullgraph=False: graph breaks where diffusers' cache hooks decide" if peer else ""
        _report(report, "compile_export", f"applied: torch.compile ({args.compile_scope}, mode={args.compile_mode}"
                                          f"{breaks}); {decoder_and_encoders(pipeline, args)}")
    else:
        _report(report, "compile_export", export_aoti(pipeline, args))

    pipeline.harness_stack = report
    return pipeline


def decoder_and_encoders(pipeline: DiffusionPipeline, args: argparse.Namespace, graphs: bool = False) -> str:
    """The pipeline's other models under --compile_export_mode compile: the VAE decoder (with the PIL pixels made on
    the device) and the text encoders, each unless its --disable_* flag; with `graphs` (the step is recorded as CUDA
    graphs) and --text_encoder_graphs, the text encoders are recorded too."""
    if getattr(args, "disable_vae_compile", False):
        vae = "VAE decoder eager (--disable_vae_compile)"
    else:
        pixels_on_device(pipeline.image_processor)
        vae = compile_utils.compile_vae_decoder(pipeline) + "; PIL pixels made on the device"
    if getattr(args, "disable_text_encoder_compile", False):
        return f"{vae}; text encoders eager (--disable_text_encoder_compile)"
    encoders = compile_utils.compile_text_encoders(pipeline)
    if graphs and getattr(args, "text_encoder_graphs", False):
        from utils.step_graphs import install_encoder_graphs

        graphed = compile_utils.flux_text_encoders(pipeline)
        for model in graphed:
            install_encoder_graphs(model)
        encoders += f", their layers one CUDA graph per prompt shape ({len(graphed)} encoders)" if graphed else ""
    elif getattr(args, "text_encoder_graphs", False):
        encoders += ", no CUDA graphs (no CUDA device)"
    return f"{vae}; {encoders}"


def pixels_on_device(image_processor) -> None:
    """The decoded image's PIL conversion with its arithmetic where the image is: diffusers' postprocess copies the
    bf16 image to the host and scales, rounds and casts 3 million float32 values there (~12 ms of a 1 s image on an
    H100 host); here the device does it and 3 MB of uint8 come back. The same IEEE float32 arithmetic and
    round-half-to-even, so the same pixels."""
    from PIL import Image

    original = image_processor.postprocess

    def postprocess(image: torch.Tensor, output_type: str = "pil", do_denormalize=None):
        if output_type != "pil" or image.ndim != 4:
            return original(image, output_type=output_type, do_denormalize=do_denormalize)
        image = image_processor._denormalize_conditionally(image, do_denormalize)
        pixels = (image.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p.squeeze(-1), mode="L") if p.shape[-1] == 1 else Image.fromarray(p) for p in pixels]

    image_processor.postprocess = postprocess


def quantize_float8(transformer: torch.nn.Module, granularity: str) -> str:
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
    except ImportError as e:
        raise SystemExit(f"error: float8 quantization needs torchao (pip install torchao), or pass --disable_quant "
                         f"[{e}]") from None
    gran = PerTensor() if granularity == "tensor" else PerRow()
    # set_inductor_config=False: torchao otherwise turns on coordinate-descent tuning (and more) process-wide, which
    # belongs to the inductor layer and its --disable_inductor_tuning_flags (docs/DESIGN.md).
    qwen = type(transformer).__name__ == "QwenImageTransformer2DModel"
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=gran, set_inductor_config=False),
              filter_fn=in_qwen_image_stream if qwen else in_blocks)
    where = "image-stream linears of the blocks (text stream bf16)" if qwen else "linears of the blocks"
    return f"applied: torchao float8 dynamic activation + weight, {type(gran).__name__}, {where}"


def in_blocks(module: torch.nn.Module, fqn: str) -> bool:
    """float8 only for the repeated blocks' linears (>99.9% of the FLOPs). The embedders and the output layer run
    eagerly outside the compiled blocks, where torchao's per-call quantization adds CPU time and kernels to every
    step for GEMMs too small to gain, and a feature-cache forecast step (~2.5 ms of GPU work) cannot hide them."""
    return isinstance(module, torch.nn.Linear) and fqn.startswith(("transformer_blocks.", "single_transformer_blocks."))


QWEN_TEXT_STREAM = (".txt_mod.", ".txt_mlp.", ".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj",
                    ".attn.to_add_out")


def in_qwen_image_stream(module: torch.nn.Module, fqn: str) -> bool:
    """Qwen-Image's blocks without their text stream. Its text is as long as the prompt (tens of tokens, where FLUX
    pads to 512): float8 gains nothing on GEMMs of so few rows, and cuBLASLt refuses a per-row float8 GEMM of 28 rows
    at K=12288 (`CUBLAS_STATUS_NOT_SUPPORTED` in the text MLP's down-projection on an H100), so those stay bf16."""
    return in_blocks(module, fqn) and not any(part in f".{fqn}" for part in QWEN_TEXT_STREAM)


def export_aoti(pipeline: DiffusionPipeline, args: argparse.Namespace) -> str:
    example = compile_utils.transformer_example_kwargs(pipeline, args.height, args.width, args.max_sequence_length)
    key = compile_utils.export_cache_key(pipeline, example, stack_flags(args))
    build = compile_utils.load_or_build_regional_aoti if args.compile_scope == "regional" else \
        compile_utils.load_or_build_aoti  # regional: a package per block kind; the glue is replayed in the CUDA graph
    try:
        compiled, status = build(pipeline.transformer, example, key, args.cache_dir,
                                 require_cached=args.use_cached_model)
    except compile_utils.PackageLoadError as e:
        raise SystemExit(f"error: {e}") from None
    compile_utils.install_compiled_forward(pipeline.transformer, compile_utils.cudagraph(compiled))
    return f"applied: torch.export + AOTInductor ({status}) + CUDA graphs"


def stack_summary(pipeline) -> dict[str, Any]:
    return dict(getattr(pipeline, "harness_stack", {}))

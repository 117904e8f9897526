"""Context parallelism: one image split over the GPUs of a `torchrun` launch, through diffusers' own context
parallelism (`ContextParallelConfig` + `ModelMixin.enable_parallelism`, diffusers 0.42.1).

How diffusers splits FLUX (`FluxTransformer2DModel._cp_plan`): a hook before the transformer's forward keeps 1/N
of the image tokens, of the text tokens and of their position ids on each rank; a hook after `proj_out` all-gathers
the image tokens, so every rank leaves the transformer with the whole output and runs the same scheduler step.
Everything between works on the rank's share of the tokens, except attention, which needs every token:

* `ulysses`: an all-to-all trades the token split for a head split before attention (each rank attends over all
  tokens for heads/N heads) and back after it. Needs the heads and both token counts divisible by N.
* `ring`: each rank keeps its queries and all-gathers the keys/values, attends to one rank's chunk at a time and
  merges the partial results by their log-sum-exp. Needs both token counts divisible by N, and a kernel that
  returns the log-sum-exp.

The attention processor receives the split through the `_parallel_config` attribute that `enable_parallelism`
sets on every processor that has one. diffusers' processors hand it to diffusers' attention dispatcher; this
harness's FA3 processor calls its kernel directly, so here it is replaced by `ContextParallelFA3Processor`, which
runs the same FA3 op as the kernel (`forward_op`) inside diffusers' templated Ulysses / ring attention. The
collectives and the ring merge are diffusers'; none is written here.

Where the layer sits in `optimize()` (layer 7, after float8 and the inductor flags, before compile): after every
layer that picks the attention processors (2 attention, 3 Chipmunk), because `enable_parallelism` hands its config
to the processors present when it runs and a processor set later would attend over its own share of the tokens
only; before compilation (8), so that torch.compile traces the split and gather hooks and the collectives. The
layers between (feature caching, float8, inductor flags) do not care whether the tokens are split.

How each layer composes (refusals are `StackError`s raised by `validate_parallel_args`, before any work):

* QKV fusion, float8 (per-row scales are per token; per-tensor activation scales are then taken over the rank's
  tokens), inductor flags, torch.compile (`--compile_mode default` / `max-autotune-no-cudagraphs`, full or
  regional): applied unchanged.
* FA3 (bf16 and `--fa3_fp8`) with `ulysses`; bf16 FA3 with `ring`, whose merge takes FA3's log-sum-exp. Refused:
  `--fa3_fp8` with `ring` (the float8 kernel's log-sum-exp is not wired). Without FA3, diffusers' attention: its
  `native` backend (SDPA) with `ulysses`, its `_native_cudnn` backend with `ring` (SDPA's native backend returns no
  log-sum-exp). `ring` is refused on CPU without the FA3 layer: every diffusers backend that returns the
  log-sum-exp needs CUDA.
* Feature caching, scheduled modes (fora, taylor, hicache): applied. Each rank caches and forecasts its own tokens
  (a forecast is elementwise in the tokens) and the full/forecast decision comes from the step index, the same on
  every rank. Refused: fbcache and cache-dit, whose skip decision is computed from each rank's share of the tokens
  and can differ between ranks; ranks that disagree would enter different collectives and hang.
* Chipmunk: refused. Its per-layer sparse caches and its token reorder index the whole image sequence.
* `--compile_export_mode export_aoti`: refused (an AOTInductor package per block has no place for the collectives;
  the default under context parallelism is `compile`). CUDA-graph compile modes (`reduce-overhead`,
  `max-autotune`): refused; the harness's step graphs record one process's forward and were not built for
  collectives inside it.
* `--check`: refused (the checks compare single-process runs).

The degree is the world size of the launch; the process group is created from torchrun's environment (nccl on
CUDA, gloo on CPU), each rank on the GPU of its LOCAL_RANK. Every rank runs the whole pipeline (text encoders,
scheduler and VAE are replicated; only the transformer's tokens are split); rank 0 alone writes images and
records. On a host without an accelerator, diffusers 0.42.1's `enable_parallelism` computes its device as
`rank % torch.accelerator.device_count()`, a division by zero; the device it computes is only recorded, so
`_accelerator_count_for_cpu` lets that call see one device, and the mesh is built here on the pipeline's device.

Records under torchrun (run_benchmark.py, rank 0): `world_size`, `context_parallel`, every rank's peak GPU
memory and host RSS, every rank's median latency, and the latency figures from rank 0. The runs behind the
docs/RESULTS.md row, each with its 1-GPU figure in the same command (50 steps, 1024^2, medians of 5; FLUX.1-dev
architecture with random weights, or `--ckpt black-forest-labs/FLUX.1-dev` where the weights are present):

    COMMON="--ckpt random:flux-dev --num_inference_steps 50 --height 1024 --width 1024 --num_runs 5 --warmup_runs 2"
    HICACHE="--cache_mode hicache --interval 7"   # HiCache N=7 (first_enhance 3, max_order 2: the defaults)
    # dense stack (FA3 bf16, float8, compile): 1 GPU (compile, as the parallel runs; then export_aoti, the
    # 1-GPU default), then ulysses and ring over 2 GPUs
    python run_benchmark.py $COMMON --results_dir results/cp --compile_export_mode compile && \
      python run_benchmark.py $COMMON --results_dir results/cp && \
      torchrun --nproc-per-node 2 run_benchmark.py $COMMON --results_dir results/cp --context_parallel ulysses && \
      torchrun --nproc-per-node 2 run_benchmark.py $COMMON --results_dir results/cp --context_parallel ring
    # HiCache N=7: 1 GPU, then ulysses over 2 GPUs
    python run_benchmark.py $COMMON $HICACHE --results_dir results/cp && \
      torchrun --nproc-per-node 2 run_benchmark.py $COMMON $HICACHE --results_dir results/cp --context_parallel ulysses
    # 4 GPUs: the same with --nproc-per-node 4 (24 heads, 4096 image and 512 text tokens divide by 4)

Each record's `stack` says which attention kernel ran under the split, and `ranks` the per-rank memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from utils import attention
from utils.attention import FA3FluxAttnProcessor
from utils.benchmark_utils import DATA_DEPENDENT_CACHES
from utils.errors import StackError

MODES = ("none", "ulysses", "ring")


# --- the launch ------------------------------------------------------------------------------------

def launch_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None when not launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def is_parallel() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_parallel() else 0


def world_size() -> int:
    return dist.get_world_size() if is_parallel() else 1


def is_main() -> bool:
    """Whether this process writes images and records: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    if is_parallel():
        dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a one-element list outside a launch)."""
    if not is_parallel():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def shutdown() -> None:
    if is_parallel():
        dist.destroy_process_group()


_GROUP_CREATED_HERE = False


def init_process_group(device: str) -> None:
    """The default process group from torchrun's environment: nccl for CUDA, gloo for CPU. Kept if this module made
    it already (several pipelines in one launch); one made by another caller is refused: its ranks may be running
    different work (a sweep's shards), and context parallelism needs every rank on the same image."""
    global _GROUP_CREATED_HERE
    if is_parallel():
        if not _GROUP_CREATED_HERE:
            raise StackError("--context_parallel needs every rank of the launch on the same image, but the process "
                             "group was created by the caller (a torchrun sweep shares its variants' images out over "
                             "its ranks): run the variant with run_benchmark.py or gen_image.py under torchrun")
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl", device_id=torch.device(device), timeout=timedelta(minutes=30))
    else:
        dist.init_process_group(backend="gloo", timeout=timedelta(minutes=30))
    _GROUP_CREATED_HERE = True


def peak_host_rss_gb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- validation ------------------------------------------------------------------------------------

def model_geometry(args: argparse.Namespace) -> tuple[int, int, int]:
    """(attention heads, image tokens, text tokens) of the transformer `args` will run: the tiny pipeline's, or
    FLUX.1's (24 heads, a 16x16-pixel patch per image token). Kontext's input-image tokens, added to the image
    tokens, are known only once its image is read; diffusers' split checks that they divide by the degree then."""
    if args.ckpt == "tiny":
        from utils.flux_builders import TINY_TRANSFORMER, TINY_VAE

        heads = TINY_TRANSFORMER["num_attention_heads"]
        pixels_per_token = 2 * 2 ** (len(TINY_VAE["block_out_channels"]) - 1)
    else:
        heads, pixels_per_token = 24, 16
    image_tokens = (args.height // pixels_per_token) * (args.width // pixels_per_token)
    return heads, image_tokens, args.max_sequence_length


def fa3_will_apply(args: argparse.Namespace) -> bool:
    """Whether the attention layer will install the FA3 processor (as optimize() decides)."""
    if args.disable_fa3:
        return False
    return attention.fa3_unavailable_reason() is None


def validate_parallel_args(args: argparse.Namespace) -> None:
    """Refuse what context parallelism cannot run, before any work, naming the fix; resolve its defaults (each
    rank's GPU, compile instead of export). Called by validate_args when --context_parallel is not none."""
    from utils.compile_utils import CUDAGRAPH_MODES

    mode = args.context_parallel
    flag = f"--context_parallel {mode}"
    launch = launch_env()
    if launch is None:
        raise StackError(f"{flag} splits one image over the processes of a torchrun launch: run the command as "
                         f"`torchrun --nproc-per-node N SCRIPT.py ... {flag}` with N >= 2 (one GPU each), or drop "
                         f"--context_parallel")
    _, world, local_rank = launch
    if world < 2:
        raise StackError(f"{flag}: torchrun started 1 process; pass --nproc-per-node 2 or more (the degree is the "
                         f"number of processes), or drop --context_parallel")
    cuda = args.device.startswith("cuda")
    if cuda and args.device == "cuda":
        args.device = f"cuda:{local_rank}"  # each rank on its own GPU
    if cuda and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(args.device))  # from here on, nothing of this rank lands on another GPU
    if args.chipmunk_config is not None and not args.disable_chipmunk:
        raise StackError(f"{flag} cannot hold Chipmunk: its per-layer sparse caches and its token reorder index the "
                         f"whole image sequence, and each rank holds 1/{world} of it. Pass --disable_chipmunk (or "
                         f"drop --chipmunk_config), or drop --context_parallel")
    if args.cache_mode in DATA_DEPENDENT_CACHES and not args.disable_cache:
        raise StackError(f"{flag} cannot hold --cache_mode {args.cache_mode}: its skip decision is computed from each "
                         f"rank's share of the tokens and can differ between ranks, which would then run different "
                         f"collectives and hang. Use a scheduled cache (--cache_mode fora, taylor or hicache), or "
                         f"--disable_cache")
    if getattr(args, "check", None):
        raise StackError(f"--check {args.check} compares single-process runs: run it without torchrun and without "
                         f"{flag}")
    if args.compile_export_mode == "export_aoti":
        raise StackError(f"{flag} cannot run under --compile_export_mode export_aoti: the exported per-block "
                         f"packages have no place for the attention's collectives. Use --compile_export_mode compile "
                         f"(the default under context parallelism) or disabled")
    if args.compile_export_mode is None:
        args.compile_export_mode = "compile" if cuda else "disabled"
        args.compile_export_mode_defaulted = True
    if args.compile_export_mode == "compile" and args.compile_mode in CUDAGRAPH_MODES and cuda:
        raise StackError(f"{flag} cannot run under --compile_mode {args.compile_mode}: the step graphs record one "
                         f"process's forward and were not built for collectives inside it. Use --compile_mode "
                         f"default (or max-autotune-no-cudagraphs)")

    fa3 = fa3_will_apply(args)
    if mode == "ring":
        if fa3 and args.fa3_fp8:
            raise StackError(f"{flag} merges each chunk's attention by its log-sum-exp, which the FA3 float8 path "
                             f"does not return here: drop --fa3_fp8 (bf16 FA3), or use --context_parallel ulysses")
        if not fa3 and not cuda:
            raise StackError(f"{flag} merges each chunk's attention by its log-sum-exp: diffusers' SDPA (native) "
                             f"backend returns none and its backends that do (cuDNN, flash, sage) need CUDA. On CPU "
                             f"use --context_parallel ulysses")
        if not fa3 and args.disable_bf16:
            raise StackError(f"{flag} without FA3 attends through diffusers' cuDNN backend, which takes bf16/fp16: "
                             f"drop --disable_bf16, or use --context_parallel ulysses")

    heads, image_tokens, text_tokens = model_geometry(args)
    if mode == "ulysses" and heads % world:
        raise StackError(f"{flag} gives each of the {world} ranks heads/{world} attention heads: the model's {heads} "
                         f"heads do not divide by {world}. Launch a number of processes that divides {heads}, or use "
                         f"--context_parallel ring")
    for what, count, fix in (("image", image_tokens, "pick --height/--width"),
                             ("text", text_tokens, "pick --max_sequence_length")):
        if count % world:
            raise StackError(f"{flag} splits the {what} tokens evenly over the {world} ranks: {count} {what} tokens "
                             f"do not divide by {world}; {fix} so that they do, or launch a number of processes that "
                             f"divides {count}")


# --- the layer -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _accelerator_count_for_cpu():
    """On a host without an accelerator, let diffusers' enable_parallelism see one device: it computes a device as
    `rank % torch.accelerator.device_count()` (a division by zero there) and only records it."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def apply_context_parallel(pipeline, args: argparse.Namespace) -> str:
    """Split the transformer's tokens over the launch's ranks (diffusers' enable_parallelism); the status line."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    transformer = pipeline.transformer
    device = transformer.device
    init_process_group(str(device) if device.type != "cuda" else f"cuda:{device.index or 0}")
    world, mode = dist.get_world_size(), args.context_parallel

    processors = set(map(type, transformer.attn_processors.values()))
    if processors == {FA3FluxAttnProcessor}:
        fp8 = next(iter(transformer.attn_processors.values())).fp8
        if mode == "ring" and device.type == "cuda":
            _check_fa3_lse(device)
        transformer.set_attn_processor(ContextParallelFA3Processor(fp8=fp8))
        kernel = "FA3 " + ("fp8" if fp8 else "bf16") + " as the kernel of diffusers' " + mode + " attention"
    elif all(hasattr(p, "_parallel_config") and hasattr(p, "_attention_backend")
             for p in transformer.attn_processors.values()):
        if mode == "ring":
            transformer.set_attention_backend("_native_cudnn")  # SDPA's native backend returns no log-sum-exp
            kernel = "diffusers' _native_cudnn backend"
        else:
            kernel = "diffusers' native (SDPA) backend"
    else:
        names = ", ".join(sorted(p.__name__ for p in processors))
        raise StackError(f"--context_parallel {mode}: the attention processors ({names}) call their kernel directly, "
                         f"so diffusers' context parallelism cannot split their attention")

    ring, ulysses = (world, 1) if mode == "ring" else (1, world)
    mesh = init_device_mesh(device.type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=mesh)
    with _accelerator_count_for_cpu():
        transformer.enable_parallelism(config=config)
    backend = dist.get_backend()
    return f"applied: diffusers {mode}, degree {world} ({backend}), attention: {kernel}"


def _check_fa3_lse(device: torch.device) -> None:
    q = torch.zeros(1, 128, 1, 64, device=device, dtype=torch.bfloat16)
    if attention.fa3_attention_with_lse(q, q, q)[1] is None:
        raise StackError("--context_parallel ring merges each chunk's attention by its log-sum-exp, which this FA3 "
                         "build does not return: use --context_parallel ulysses, or --disable_fa3 (diffusers' cuDNN "
                         "attention)")


# --- FA3 inside diffusers' templated context-parallel attention -------------------------------------

@torch.library.custom_op("flux_harness::fa3_attention_lse", mutates_args=(), device_types=None)
def fa3_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention on (batch, seq, heads, head_dim) tensors and the log-sum-exp of each query's scaled
    scores ((batch, seq, heads), float32, natural log): what ring attention merges chunks by. FA3 on a Hopper GPU; on
    CPU, PyTorch's CPU flash-attention kernel (the kernel of the FA3 op's SDPA fallback there, with its
    log-sum-exp)."""
    if attention.FA3_AVAILABLE and q.is_cuda:
        out, lse = attention.fa3_attention_with_lse(q, k, v)
        if lse is None:
            raise RuntimeError("this FA3 build returns no log-sum-exp: ring attention cannot merge its chunks")
        return out.contiguous(), lse.transpose(1, 2).contiguous()
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[:2]
        return out.transpose(1, 2).contiguous(), lse.float().transpose(1, 2).contiguous()
    raise RuntimeError(f"no attention kernel with a log-sum-exp for {q.device} tensors without FA3")


@fa3_attention_lse.register_fake
def _(q, k, v):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32))


def _fa3_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' forward_op contract (attention_dispatch.py): the rank's attention after the all-to-all (Ulysses)
    or on one key/value chunk (ring, which asks for the log-sum-exp)."""
    if return_lse:
        return fa3_attention_lse(query, key, value)
    return attention.fa3_attention(query, key, value)


def _fa3_fp8_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    return attention.fa3_fp8_attention(query, key, value)


def _no_backward_op(ctx, grad_out, *args, **kwargs):
    raise NotImplementedError("the FA3 context-parallel attention is inference only")


def _templated_attention():
    from diffusers.models import attention_dispatch

    return attention_dispatch._templated_context_parallel_attention


class ContextParallelFA3Processor(FA3FluxAttnProcessor):
    """The FA3 processor under context parallelism: enable_parallelism sets `_parallel_config`, and attention runs
    through diffusers' templated Ulysses / ring attention with the FA3 op as its kernel. Without a config (before
    enable_parallelism) it is the FA3 processor."""

    _parallel_config = None

    def attend(self, q, k, v, block_input=None):
        config = self._parallel_config
        if config is None:
            return super().attend(q, k, v, block_input)
        forward_op = _fa3_fp8_forward_op if self.fp8 else _fa3_forward_op
        return _templated_attention()(q, k, v, None, 0.0, False, None, False, False, forward_op=forward_op,
                                      backward_op=_no_backward_op, _parallel_config=config)

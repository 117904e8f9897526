"""Inductor tuning (flags, a GELU that inductor compiles to cheap code), torch.compile (full or regional), and
torch.export + AOTInductor (the whole transformer, or one package per block kind) + CUDA graphs.

The export path keeps its compiled packages on disk under `--cache-dir`, in a file whose name is a
hash of everything that changes the compiled code (GPU, torch/diffusers versions, input shapes and
dtypes, model config, stack flags). A sidecar JSON repeats those fields and is checked on load, so a
package built for other conditions is rebuilt, never used. Weights are not baked into the package
(`package_constants_in_so=False`): the live transformer's tensors are handed to it at load time.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch.utils._pytree import tree_leaves, tree_map


# float8's per-row activation scales reduce rows of 12288-15360 elements, beyond inductor's persistent threshold: the
# looped form reads each row twice. multi_kernel benchmarks the persistent (one-read) form against it per kernel and
# keeps the faster (~2 ms a step on the H200; docs/RESULTS.md).
PERSISTENT_REDUCTION_FLAGS: dict[str, Any] = {
    "triton.multi_kernel": 1,
    # torch 2.11: a graph with multi-kernels loaded from the FX-graph cache crashes (MultiKernelCall.load_cache:
    # JITFunction.cache_key's _hash_lock is None after the round trip). Graphs are compiled afresh; Triton's
    # autotuning results, the slow part, are cached apart and still reused.
    "fx_graph_cache": False,
}


def set_inductor_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Sets inductor config entries by name ("triton.multi_kernel" for a nested one); returns them."""
    for name, value in flags.items():
        section, _, key = name.rpartition(".")
        setattr(getattr(torch._inductor.config, section) if section else torch._inductor.config, key, value)
    return flags


def set_inductor_tuning_flags() -> dict[str, Any]:
    """flux-fast's inductor settings plus persistent row reductions, grouped here so an ablation can drop them in one
    flag. Measured together on the H200 (random:flux-dev 1024^2, float8 stack, one CUDA graph per forward): 84.2 ms
    per step against 88.1 without the tuning (docs/RESULTS.md)."""
    return set_inductor_flags({
        "conv_1x1_as_mm": True,  # the VAE's 1x1 convolutions as matmuls
        "epilogue_fusion": False,  # measured faster for FLUX in flux-fast
        "coordinate_descent_tuning": True,  # tune Triton block sizes of generated kernels
        "coordinate_descent_check_all_directions": True,
        **PERSISTENT_REDUCTION_FLAGS,
    })


class TanhGELU(torch.nn.Module):
    """GELU's tanh approximation, written as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the same function
    (0.5 (1 + tanh(u)) = sigmoid(2u)), for inductor. On CUDA inductor emits tanh as libdevice.tanh, dozens of
    instructions per element, which left the float8 step's activation-quantization kernels compute-bound (they
    recompute the MLP's GELU, once for the row amax and once for the cast: 12.9 of 90.6 ms device time on the
    H200); sigmoid lowers to ex2.approx and div.full (compiled
    for sm_90: 107 PTX instructions per 8 elements against 293 with branches). For compiled
    code only: eager PyTorch's own tanh-GELU kernel is already one fast pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 math in float32, as torch's own kernel
        return (xf * torch.sigmoid(1.5957691216057308 * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class LinearTanhGELU(torch.nn.Module):
    """diffusers' `GELU` block (a linear, then tanh-GELU) with TanhGELU; it keeps the same `proj` module, so weight
    names (and float8 quantization, which already swapped the weight) are unchanged."""

    def __init__(self, proj: torch.nn.Module):
        super().__init__()
        self.proj, self.act = proj, TanhGELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x))


def use_sigmoid_gelu(transformer: torch.nn.Module) -> int:
    """Swap FLUX's tanh-GELUs for TanhGELU (module replacement): the double blocks' image and text MLPs and the
    single blocks' `act_mlp` (Qwen-Image: its blocks' `img_mlp` and `txt_mlp`). MLPs that Chipmunk took over are left
    alone (its kernels compute their own GELU). Returns how many were swapped."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    swapped = 0
    for block in transformer.transformer_blocks:
        mlps = (block.img_mlp, block.txt_mlp) if hasattr(block, "img_mlp") else (block.ff, block.ff_context)
        for ff in mlps:
            if isinstance(ff, FeedForward) and isinstance(ff.net[0], GELU) and ff.net[0].approximate == "tanh":
                ff.net[0] = LinearTanhGELU(ff.net[0].proj)
                swapped += 1
    for block in getattr(transformer, "single_transformer_blocks", ()):
        act = getattr(block, "act_mlp", None)  # a Chipmunk single block has none: its kernels compute the GELU
        if isinstance(act, torch.nn.GELU) and act.approximate == "tanh":
            block.act_mlp = TanhGELU()
            swapped += 1
    return swapped


CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record and replay CUDA graphs
WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_transformer(transformer: torch.nn.Module, scope: str, mode: str, fullgraph: bool = True,
                        forward_only: bool = False) -> None:
    """Compile in place: the whole module, or only its repeated blocks (diffusers' regional compile: each block
    kind compiles once, a fraction of the cold start). `forward_only` (scope full): compile `transformer.forward`
    rather than the module's call, for a wrapper that then replaces `forward` (the step graphs): the module's
    compiled call would trace that wrapper, whose Python the graphs' bookkeeping needs to run every step."""
    if scope == "regional":
        transformer.compile_repeated_blocks(fullgraph=fullgraph, mode=mode)
    elif forward_only:
        transformer.forward = torch.compile(transformer.forward, fullgraph=fullgraph, mode=mode)
    else:
        transformer.compile(fullgraph=fullgraph, mode=mode)


def compile_vae_decoder(pipeline) -> str:
    """FLUX's VAE decoder in channels_last and compiled (mode default: one call per image, so no graphs needed), as
    flux-fast does: its convolutions stay cuDNN's, inductor fuses the group norms and SiLUs around them. Qwen-Image's
    causal 3D decoder keeps its feature caches in Python lists, and stays eager."""
    vae = pipeline.vae
    if type(vae).__name__ != "AutoencoderKL":
        return f"VAE decoder eager ({type(vae).__name__} is not compiled)"
    vae.to(memory_format=torch.channels_last)
    vae.decoder.compile(fullgraph=True, mode="default")
    return "VAE decoder channels_last + torch.compile"


def text_encoder_layer_owner(model) -> tuple[torch.nn.Module, str] | None:
    """(the module holding the repeated layers of FLUX's CLIP or T5 text encoder, the attribute); None for another
    encoder."""
    name = type(model).__name__
    if name == "CLIPTextModel":
        return getattr(model, "text_model", model).encoder, "layers"  # transformers 5 dropped the text_model level
    if name == "T5EncoderModel":
        return model.encoder, "block"
    return None


def text_encoder_layers(model) -> torch.nn.ModuleList | None:
    """The repeated layers of FLUX's CLIP and T5 text encoders (None for another encoder)."""
    owner = text_encoder_layer_owner(model)
    return getattr(*owner) if owner else None


def flux_text_encoders(pipeline) -> list[torch.nn.Module]:
    """The pipeline's text encoders that text_encoder_layers knows (FLUX's CLIP and T5)."""
    models = [getattr(pipeline, attribute, None) for attribute in ("text_encoder", "text_encoder_2")]
    return [model for model in models if text_encoder_layers(model) is not None]


def compile_text_encoders(pipeline) -> str:
    """FLUX's CLIP and T5 text encoders compiled layer by layer (mode default: one call per image). Eager, the T5-XXL
    encoder runs ~60 small kernels per layer, from Python, over 24 layers; compiled, inductor fuses its float32
    RMSNorms, gated GELU and residual adds into a few kernels per layer. The prompt is padded to one length, so each
    layer compiles once. Qwen-Image's Qwen2.5-VL encoder stays eager."""
    compiled = []
    for model in flux_text_encoders(pipeline):
        layers = text_encoder_layers(model)
        for layer in layers:
            layer.compile(fullgraph=True, mode="default")
        compiled.append(f"{type(model).__name__} ({len(layers)} layers)")
    return "text encoders torch.compile: " + ", ".join(compiled) if compiled else "text encoder eager"


# --- export + AOTInductor -------------------------------------------------------------------------

TENSOR_KWARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                 "guidance")


def transformer_example_kwargs(pipeline, height: int, width: int, max_sequence_length: int,
                               batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Inputs of the exact shapes the pipeline will feed the transformer (kontext: 2x image tokens). Qwen-Image's
    text is as long as its prompt: `max_sequence_length` stands for that length there."""
    t = pipeline.transformer
    device, dtype = t.device, t.dtype
    if type(t).__name__ == "QwenImageTransformer2DModel":
        grid_h, grid_w = height // pipeline.vae_scale_factor // 2, width // pipeline.vae_scale_factor // 2
        return dict(hidden_states=torch.randn(batch_size, grid_h * grid_w, t.config.in_channels, device=device,
                                              dtype=dtype),
                    encoder_hidden_states=torch.randn(batch_size, max_sequence_length, t.config.joint_attention_dim,
                                                      device=device, dtype=dtype),
                    timestep=torch.full((batch_size,), 0.5, device=device, dtype=dtype),
                    img_shapes=[[(1, grid_h, grid_w)]] * batch_size)
    latent_h, latent_w = 2 * (height // (pipeline.vae_scale_factor * 2)), 2 * (width // (pipeline.vae_scale_factor * 2))
    img_tokens = (latent_h // 2) * (latent_w // 2)
    if "Kontext" in type(pipeline).__name__:
        img_tokens *= 2
    kwargs = dict(
        hidden_states=torch.randn(batch_size, img_tokens, t.config.in_channels, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch_size, max_sequence_length, t.config.joint_attention_dim,
                                          device=device, dtype=dtype),
        pooled_projections=torch.randn(batch_size, t.config.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.full((batch_size,), 0.5, device=device, dtype=dtype),
        img_ids=torch.randn(img_tokens, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(max_sequence_length, 3, device=device, dtype=dtype),
    )
    if t.config.guidance_embeds:
        kwargs["guidance"] = torch.full((batch_size,), 3.5, device=device, dtype=torch.float32)
    return kwargs


def export_cache_key(pipeline, example_kwargs: dict[str, torch.Tensor], stack: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    dev = next(iter(example_kwargs.values())).device
    return {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "cxx": cxx_compiler(),  # the package's .so is built by it; a package built by another one is rebuilt
        # A package calls the harness's custom ops by schema: one built against an older signature would fail.
        "ops": sorted(str(s) for s in torch._C._jit_get_all_schemas() if s.name.startswith("flux_harness::")),
        "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(example_kwargs.items())},
        "transformer_config": {k: v for k, v in dict(pipeline.transformer.config).items() if not k.startswith("_")},
        "stack": stack,
    }


def cxx_compiler() -> str:
    """The C++ compiler AOTInductor builds its .so with: torch reads $CXX once, when inductor's config is imported."""
    return torch._inductor.config.cpp.cxx[1]


def export_package_path(cache_dir: str | Path, key: dict[str, Any], stem: str = "flux_transformer") -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{stem}_{digest}.pt2"


def _load_or_build_package(module: torch.nn.Module, kwargs: dict[str, Any], key: dict[str, Any], path: Path,
                           require_cached: bool) -> tuple[Any, str]:
    """`module` exported with these call kwargs and AOTInductor-compiled into `path` (or found there, when its
    sidecar JSON equals `key`), loaded with `module`'s own tensors as its constants.

    The check and the build hold an exclusive lock on `path`.lock, so processes sharing a cache directory build a
    package once: one that finds another process building it waits, then loads it (scripts/h100_stages.py
    --aoti_build_only builds one block kind in a second process while the first builds the other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[export] another process is building {path.name}: waiting for it", flush=True)
            t0 = time.perf_counter()
            fcntl.flock(lock, fcntl.LOCK_EX)
            print(f"[export] waited {time.perf_counter() - t0:.0f} s for {path.name}", flush=True)
        status = _build_unless_cached(module, kwargs, key, path, require_cached)
    return load_package_with_weights(path, module), status


def _build_unless_cached(module: torch.nn.Module, kwargs: dict[str, Any], key: dict[str, Any], path: Path,
                         require_cached: bool) -> str:
    meta_path = path.with_suffix(".json")
    stored = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if path.exists() and stored == json.loads(json.dumps(key, default=str)):
        return "cached"
    if require_cached:
        raise FileNotFoundError(f"--use-cached-model: no export package matching this GPU/torch/shapes/flags at "
                                f"{path}; run once without --use-cached-model to build it")
    t0 = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(module, args=(), kwargs=kwargs, strict=False)
        print(f"[export] torch.export done in {time.perf_counter() - t0:.0f} s; AOTInductor compiling -> {path}",
              flush=True)
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(path),
            inductor_configs={"aot_inductor.package_constants_in_so": False})
    print(f"[export] package built in {time.perf_counter() - t0:.0f} s", flush=True)
    meta_path.write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
    return "built"


class PackageLoadError(RuntimeError):
    """An AOTInductor package that its loader cannot load on this machine (found in a child process)."""


_LOADS_CHECKED: set[tuple[str, float]] = set()


def check_package_loads(path: Path) -> None:
    """Load the package once in a child process before this process does. On an H200 image whose CXX was
    /opt/gcc/bin/g++ every CUDA package it built crashed the loader with a segmentation fault, even a plain bf16 MLP;
    in the run itself that would end the process and lose its results so far. The crash was in std::regex's locale
    facets inside the package's .so, and the same package built by /usr/bin/g++ loaded and matched eager
    (docs/DESIGN.md)."""
    if (str(path), path.stat().st_mtime) in _LOADS_CHECKED:
        return
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            f"import torch, utils.attention; "  # registers the FA3 custom op that the package may call
            f"torch._inductor.aoti_load_package({str(path)!r}, run_single_threaded=True)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if child.returncode != 0:
        how = f"crashed (signal {-child.returncode})" if child.returncode < 0 else f"failed (exit {child.returncode})"
        raise PackageLoadError(
            f"export_aoti: loading the AOTInductor package {path} {how} in a child process, so this process does not "
            f"load it. Such a crash has come from the C++ compiler that built the .so; this one was "
            f"{cxx_compiler()} (from $CXX). Rerun with CXX set to the system compiler, e.g. CXX=/usr/bin/g++ (the "
            f"package is then rebuilt: its cache key names the compiler). Or use "
            f"--compile_export_mode compile --compile_mode reduce-overhead: it records the compiled forward as one "
            f"CUDA graph, the same whole-step replay.\n{child.stderr[-1500:]}")
    _LOADS_CHECKED.add((str(path), path.stat().st_mtime))


def load_package_with_weights(path: Path, module: torch.nn.Module) -> Any:
    """The AOTInductor package at `path`, running on `module`'s tensors (not copied: user-managed constants)."""
    check_package_loads(path)
    # Single-threaded runner: the default container checks its models' CUDA events (cudaEventQuery) on every call,
    # which a CUDA graph capture refuses ("operation not permitted when stream is capturing";
    # pytorch/pytorch#148601 added this runner for AOTI + CUDA graphs, on FLUX).
    loaded = torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    # Only what the graph uses: after QKV fusion the state_dict still holds the unused to_q/to_k/to_v.
    wanted = set(loaded.get_constant_fqns())
    weights = {k: v for k, v in export_constants(module).items() if k in wanted}
    loaded.load_constants(weights, check_full_update=True, user_managed=True)
    return loaded


def load_or_build_aoti(transformer: torch.nn.Module, example_kwargs: dict[str, torch.Tensor], key: dict[str, Any],
                       cache_dir: str | Path, require_cached: bool = False) -> tuple[Callable, str]:
    """The AOTInductor-compiled transformer for these inputs, from the cache or built now.

    Returns (callable taking the tensor kwargs, "cached <package>" | "built <package>").
    """
    path = export_package_path(cache_dir, key)
    loaded, status = _load_or_build_package(transformer, {**example_kwargs, "return_dict": False}, key, path,
                                            require_cached)
    return (lambda **tensors: loaded(**tensors, return_dict=False)), f"{status} {path.name}"


class BlockTensors(torch.nn.Module):
    """A FLUX block called with its tensors only (the export target of the regional path: no
    joint_attention_kwargs, which the transformer passes as None or {})."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        return self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                          image_rotary_emb=image_rotary_emb)


def load_or_build_regional_aoti(transformer: torch.nn.Module, example_kwargs: dict[str, torch.Tensor],
                                key: dict[str, Any], cache_dir: str | Path,
                                require_cached: bool = False,
                                kinds: tuple[str, ...] = ("double", "single")) -> tuple[Callable, str]:
    """Regional export: one AOTInductor package per block kind (double-stream, single-stream), each built from the
    first block of its kind and loaded once per block with that block's weights; every block's forward then runs
    its package. The repeated blocks compile once per kind, as regional torch.compile does: the whole 57-block
    transformer did not finish building in 8 minutes on a 16-core H200 host. The glue between blocks (embedders, RoPE, output layer) stays
    eager Python: CUDA-graph the returned forward to replay it with the blocks.

    `kinds` limits the work to some block kinds (the others keep their forward): a second process can build
    ("single",) while this one builds the double blocks (on the H200: 97 s within the double block's 328 s); the
    lock on each package makes this process wait for, then load, what the second built.

    Returns (the transformer's forward taking the tensor kwargs, a status line), like load_or_build_aoti."""
    unknown = set(kinds) - {"double", "single"}
    if unknown:
        raise ValueError(f"regional export: unknown block kinds {sorted(unknown)}; choose from double, single")
    first: dict[str, dict[str, Any]] = {}

    def keep(kind):
        def hook(module, args, kwargs):
            first.setdefault(kind, kwargs)
        return hook

    selected = [(kind, blocks) for kind, blocks in (("double", transformer.transformer_blocks),
                                                    ("single", transformer.single_transformer_blocks)) if kind in kinds]
    handles = [blocks[0].register_forward_pre_hook(keep(kind), with_kwargs=True) for kind, blocks in selected]
    try:
        with torch.no_grad():
            transformer(**example_kwargs, return_dict=False)  # the blocks' inputs, as the transformer makes them
    finally:
        for handle in handles:
            handle.remove()
    statuses = []
    for kind, blocks in selected:
        inputs = {name: first[kind][name] for name in ("hidden_states", "encoder_hidden_states", "temb",
                                                        "image_rotary_emb")}
        block_key = {**key, "block": kind,
                     "block_inputs": [[list(t.shape), str(t.dtype)] for t in tree_leaves(inputs)]}
        path = export_package_path(cache_dir, block_key, stem=f"flux_{kind}_block")
        loaded, status = _load_or_build_package(BlockTensors(blocks[0]), inputs, block_key, path, require_cached)
        blocks[0].forward = _package_forward(loaded)
        t0 = time.perf_counter()  # the other blocks' loads (0.1 s per block kind on the H200)
        for block in blocks[1:]:
            block.forward = _package_forward(load_package_with_weights(path, BlockTensors(block)))
        statuses.append(f"{len(blocks)} {kind} blocks ({status} {path.name}; {len(blocks) - 1} more loads "
                        f"{time.perf_counter() - t0:.1f} s)")
    eager_forward = transformer.forward  # Python glue, blocks now on their packages
    return (lambda **tensors: eager_forward(**tensors, return_dict=False)), "regional: " + ", ".join(statuses)


def _package_forward(loaded: Any) -> Callable:
    def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        if joint_attention_kwargs:
            raise ValueError("export_aoti: joint_attention_kwargs (LoRA scale, IP-adapter) are not part of the "
                             "exported blocks; use --compile_export_mode compile")
        return loaded(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                      image_rotary_emb=image_rotary_emb)

    forward.is_aoti = True
    return forward


def export_constants(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors under the names an exported package knows them by. Tensor-subclass weights
    (torchao float8) are exported as their plain inner tensors, named `<owner>.parametrizations.<name>.
    original<i>`, in the order torch's own unwrapping produces them."""
    from torch._functorch._aot_autograd.subclass_parametrization import UnwrapTensorSubclass
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    constants = {}
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if is_traceable_wrapper_subclass(tensor):
            owner, _, attr = name.rpartition(".")
            prefix = f"{owner}.parametrizations.{attr}" if owner else f"parametrizations.{attr}"
            for i, inner in enumerate(UnwrapTensorSubclass().right_inverse(tensor)):
                constants[f"{prefix}.original{i}"] = inner
        else:
            constants[name] = tensor
    return constants


def cudagraph(fn: Callable) -> Callable:
    """Capture `fn(**tensor_kwargs)` in a CUDA graph per input-shape signature; replay with copies in."""
    graphs: dict[tuple, tuple] = {}

    def wrapped(**kwargs):
        sig = tuple((k, tuple(v.shape)) for k, v in sorted(kwargs.items()))
        if sig not in graphs:
            static_in = tree_map(lambda t: t.clone(), kwargs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn(**static_in)  # warm-up outside capture, as CUDA graphs require
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(**static_in)
            graphs[sig] = (graph, static_in, static_out)
        graph, static_in, static_out = graphs[sig]
        for k, v in kwargs.items():
            static_in[k].copy_(v)
        graph.replay()
        return tree_map(lambda t: t.clone(), static_out)

    return wrapped


def tensor_forward(transformer: torch.nn.Module) -> Callable:
    """The transformer's forward as it is now (compiled blocks, eager glue) as a callable of its tensors alone, for
    install_compiled_forward. It hands the blocks joint_attention_kwargs={}, as FluxPipeline does (it turns None into
    {}; install_compiled_forward refuses any other): the compiled blocks guard on that argument's type, and None
    recompiled every block kind (3 graphs), whose kernels inductor may tune to other configs than the pipeline's
    own run, rounding differently. On the H200 Chipmunk's step graphs, so recompiled, differed from eager by 4e-3
    in some processes."""
    eager_forward = transformer.forward
    if type(transformer).__name__ == "QwenImageTransformer2DModel":  # QwenImagePipeline passes attention_kwargs={}
        return lambda **inputs: eager_forward(**inputs, attention_kwargs={}, return_dict=False)
    return lambda **tensors: eager_forward(**tensors, joint_attention_kwargs={}, return_dict=False)


# Qwen-Image's forward: its tensors (the text mask when prompts of a batch differ in length) and `img_shapes`, the
# latent grid per image, a list that is fixed for a given size (one graph per value: StepGraphs keys on it).
QWEN_TENSOR_KWARGS = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance")
QWEN_STATIC_KWARGS = ("img_shapes",)


def install_compiled_forward(transformer: torch.nn.Module, compiled: Callable, what: str = "export_aoti") -> None:
    """Route the transformer's forward (as the pipeline calls it) to `compiled(**tensor_kwargs)` (`what` names it in
    errors); for Qwen-Image also its `img_shapes`."""
    eager_forward = transformer.forward
    qwen = type(transformer).__name__ == "QwenImageTransformer2DModel"
    names = QWEN_TENSOR_KWARGS + QWEN_STATIC_KWARGS if qwen else TENSOR_KWARGS

    def forward(hidden_states=None, return_dict=True, **kwargs):
        kwargs["hidden_states"] = hidden_states
        tensors = {k: v for k, v in kwargs.items() if k in names and v is not None}
        if kwargs.get("joint_attention_kwargs") or kwargs.get("attention_kwargs"):
            raise ValueError(f"{what}: joint_attention_kwargs (LoRA scale, IP-adapter) are not part of the recorded "
                             f"graph; use --compile_export_mode compile with --compile_mode default")
        out = compiled(**tensors)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    forward.eager_forward = eager_forward
    forward.is_aoti = what == "export_aoti"
    transformer.forward = forward

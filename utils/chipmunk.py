"""Chipmunk: dynamic column-sparse deltas for FLUX, as layer 3 of the stack (`--chipmunk_config`).

Activations change slowly across denoising steps. On a dense step a layer caches its output; on a
sparse step it recomputes only the most important columns (attention keys, MLP neurons) and adds
their *change* to the cached output. Facts: ../shared/ALGORITHMS.md section 3.

What this file holds (the PyTorch reference defines correctness; utils/chipmunk_triton.py has the
H100 kernels for the same functions, used when the tensors are on a GPU and Triton loads):
  * config loading and validation (Chipmunk's `chipmunk-config.yml` keys),
  * token reorder: image tokens into 8x8 patches of 4x4 sub-patches, RoPE ids permuted alike,
    output un-permuted (forward hooks on the transformer),
  * sparse attention deltas: per query group, top-k key columns by softmax column sum,
    `o_cache = O_dense - A_S` on dense steps, `O = o_cache + A_S` on sparse steps,
  * sparse MLP deltas: per token block, neurons whose fc1 pre-activation changed most, plus
    random ones; the activation and output caches are updated with the delta,
  * the FLUX mapping (double blocks: joint attention + image MLP sparse, text MLP dense; single
    blocks: qkv/fc1 and attention-out/fc2 of linear2 with linear2's bias added ONCE),
  * the schedule, from the pipeline's step index (StepClock) and the layer's own index only.

Module names and roles are kept for the feature-caching layer (applied after this one): double
blocks keep `attn` (returns (img, txt)), `ff`, `ff_context`; single blocks keep `proj_out`, whose
output is still the block's one pre-gate feature (attention part + MLP part + linear2's bias once).

Forecast steps of feature caching call none of these modules. Chipmunk's caches are then left
untouched, and a dense refresh (or MLP mask reselection) that the schedule placed on a step this
layer did not compute is carried out on the next step it does compute ("deferred dense"). Why:
with caching at interval N the scheduled dense steps (0, 1, 10, 20, ...) mostly fall on forecast
steps; skipping them would leave 40+ steps of stale deltas, while deferring keeps Chipmunk's
refresh rate. When every step is computed (no caching, or interval=1) the rule reduces to the
plain schedule, so C and D of the interval=1 check run the same computation without any
special case.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from utils.attention import FA3FluxAttnProcessor, FluxKernelAttnProcessor, fa3_attention_with_lse, fa3_fp8_attention
from utils.step_clock import StepClock

FLUX_PIXELS_PER_TOKEN = 16  # VAE downsamples 8x, then 2x2 latent patches are packed into one token


# --- config ----------------------------------------------------------------------------------------

@dataclass
class MlpConfig:
    is_enabled: bool = True
    top_keys: float = 0.3  # fraction of fc1 neurons recomputed per token block
    random_keys: float = 0.05  # extra fraction chosen at random (exploration)
    full_step_every: int = 10
    block_mask_cache: int = 2  # reselect neurons every this many sparse steps
    first_n_dense_layers: int = 2
    counts_multiple_of: int = 256  # neuron count padded to the kernel tile multiple
    bm: int = 128  # tokens per block that share one neuron set ("MLP token block")
    mbm: int = 128  # Chipmunk's kernel sub-tile; accepted for compatibility, unused here
    is_fp8: bool = False


@dataclass
class AttnConfig:
    is_enabled: bool = True
    top_keys: float = 0.165  # fraction of key columns per query group
    full_step_every: int = 10
    full_step_schedule: list[int] | None = None  # if set, replaces "0, 1 and every full_step_every"
    first_n_dense_layers: int = 2
    counts_multiple_of: int = 128  # key count padded to the kernel tile multiple
    mbm: int = 192  # queries per group that share one key set ("query group")
    random_keys: float = 0.0
    recompute_mask: bool = True


@dataclass
class PatchifyConfig:
    is_enabled: bool = True
    chunk_size_1: int = 8  # outer patch side, in tokens
    chunk_size_2: int = 4  # inner sub-patch side, in tokens


@dataclass
class ChipmunkConfig:
    mlp: MlpConfig = field(default_factory=MlpConfig)
    attn: AttnConfig = field(default_factory=AttnConfig)
    patchify: PatchifyConfig = field(default_factory=PatchifyConfig)


SECTIONS = {"mlp": MlpConfig, "attn": AttnConfig, "patchify": PatchifyConfig}
IGNORED_SECTIONS = ("offloading",)  # CPU offload of Chipmunk's caches: memory placement only, not implemented


def _stack_error(message: str) -> Exception:
    from utils.pipeline_utils import StackError  # late: pipeline_utils imports this module lazily too

    return StackError(message)


def load_chipmunk_config(path: str | Path | None = None, height: int | None = None, width: int | None = None,
                         pixels_per_token: int = FLUX_PIXELS_PER_TOKEN,
                         overrides: dict[str, dict[str, Any]] | None = None) -> ChipmunkConfig:
    """Read and validate a Chipmunk YAML (keys of Chipmunk's chipmunk-config.yml; missing keys take the
    published FLUX values). Raises StackError naming the fix for unknown keys, top_keys outside (0, 1],
    and image sizes the token reorder cannot tile."""
    raw: dict[str, Any] = {}
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise _stack_error(f"--chipmunk_config {path}: no such file (see configs/chipmunk-flux.yml)")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise _stack_error(f"--chipmunk_config {path}: expected a mapping of sections (mlp, attn, patchify)")
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    where = f"--chipmunk_config {path}" if path else "chipmunk config"

    config = ChipmunkConfig()
    for section, values in raw.items():
        if section in IGNORED_SECTIONS:
            continue
        if section not in SECTIONS:
            raise _stack_error(f"{where}: unknown section {section!r}; allowed: {', '.join(SECTIONS)} "
                               f"(and {', '.join(IGNORED_SECTIONS)}, ignored). Remove or rename it.")
        cls = SECTIONS[section]
        allowed = {f.name for f in fields(cls)}
        for key, value in (values or {}).items():
            if key not in allowed:
                raise _stack_error(f"{where}: unknown key {section}.{key}; allowed in {section}: "
                                   f"{', '.join(sorted(allowed))}. Remove or rename it.")
            setattr(getattr(config, section), key, value)

    for section in ("mlp", "attn"):
        sec = getattr(config, section)
        if not isinstance(sec.top_keys, (int, float)) or isinstance(sec.top_keys, bool) or not 0 < sec.top_keys <= 1:
            raise _stack_error(f"{where}: {section}.top_keys must be a fraction in (0, 1], got {sec.top_keys!r} "
                               f"(1.0 = sparsity off; the published FLUX values are mlp 0.3, attn 0.165)")
        if not 0 <= sec.random_keys < 1:
            raise _stack_error(f"{where}: {section}.random_keys must be in [0, 1), got {sec.random_keys!r}")
        for key in ("full_step_every", "counts_multiple_of", "mbm"):
            if not isinstance(getattr(sec, key), int) or getattr(sec, key) < 1:
                raise _stack_error(f"{where}: {section}.{key} must be a positive integer, got {getattr(sec, key)!r}")
        if sec.first_n_dense_layers < 0:
            raise _stack_error(f"{where}: {section}.first_n_dense_layers must be >= 0")
    if config.mlp.is_fp8:
        raise _stack_error(f"{where}: mlp.is_fp8 is not implemented here; set it to false")
    if config.attn.random_keys:
        raise _stack_error(f"{where}: attn.random_keys is not implemented here (FLUX's config has none); set it to 0")
    if config.mlp.block_mask_cache < 1 or config.mlp.bm < 1:
        raise _stack_error(f"{where}: mlp.block_mask_cache and mlp.bm must be positive integers")
    p = config.patchify
    if p.chunk_size_1 < 1 or p.chunk_size_2 < 1 or p.chunk_size_1 % p.chunk_size_2:
        raise _stack_error(f"{where}: patchify.chunk_size_1 ({p.chunk_size_1}) must be a positive multiple of "
                           f"patchify.chunk_size_2 ({p.chunk_size_2})")
    if height is not None and width is not None and p.is_enabled:
        side = p.chunk_size_1 * pixels_per_token
        if height % side or width % side:
            def near(v: int) -> str:
                return f"{max(side, v // side * side)} or {(v // side + 1) * side}"
            raise _stack_error(f"Chipmunk's token reorder tiles the image into {p.chunk_size_1}x{p.chunk_size_1}-token "
                               f"patches, so --height and --width must be multiples of {side} px; got "
                               f"{height}x{width}. Use e.g. --height {near(height)} / --width {near(width)}, or "
                               f"--disable_chipmunk.")
    return config


def rounded_count(fraction: float, total: int, multiple: int) -> int:
    """`fraction * total` rounded to the nearest kernel tile multiple, at least one tile, at most `total`."""
    return min(total, max(multiple, int(round(fraction * total / multiple)) * multiple))


# --- token reorder ---------------------------------------------------------------------------------

def patch_order(h: int, w: int, chunk_size_1: int, chunk_size_2: int) -> torch.Tensor:
    """perm with `reordered = raster[perm]`: row-major over 8x8 patches, within each over 4x4
    sub-patches, within each row-major. Consecutive tokens are then spatially local."""
    c1, c2 = chunk_size_1, chunk_size_2
    grid = torch.arange(h * w).view(h // c1, c1, w // c1, c1).permute(0, 2, 1, 3)  # (nh, nw, c1, c1)
    grid = grid.reshape(h // c1, w // c1, c1 // c2, c2, c1 // c2, c2).permute(0, 1, 2, 4, 3, 5)
    return grid.reshape(-1)


class TokenReorder:
    """Forward hooks on the transformer: permute image tokens and their RoPE ids on the way in,
    un-permute the output on the way out. Text tokens keep their order."""

    def __init__(self, config: PatchifyConfig):
        self.config = config
        self.perm: torch.Tensor | None = None
        self.inverse: torch.Tensor | None = None
        self.key = None
        self.ids_seen: tuple | None = None  # (weakref to the ids tensor, its version): the pipeline passes one per call

    def _order_for(self, img_ids: torch.Tensor, n: int) -> None:
        seen = self.ids_seen
        if seen and seen[0]() is img_ids and seen[1] == img_ids._version and self.key[2:] == (n, img_ids.device):
            return  # reading the grid size is a host sync: once per generation (one ids tensor), not once per step
        self.ids_seen = (weakref.ref(img_ids), img_ids._version)
        ids2d = img_ids[0] if img_ids.ndim == 3 else img_ids
        h, w = int(ids2d[:, 1].max()) + 1, int(ids2d[:, 2].max()) + 1
        if (h, w, n, img_ids.device) == self.key:
            return
        c1 = self.config.chunk_size_1
        if h * w != n or h % c1 or w % c1:
            raise RuntimeError(f"Chipmunk token reorder: image grid {h}x{w} tokens ({n} tokens given) cannot be tiled "
                               f"by {c1}x{c1} patches; use an image size that is a multiple of {c1} tokens per side")
        perm = patch_order(h, w, c1, self.config.chunk_size_2).to(img_ids.device)
        self.perm, self.inverse, self.key = perm, torch.argsort(perm), (h, w, n, img_ids.device)

    def pre_hook(self, module, args, kwargs):
        hidden, img_ids = kwargs["hidden_states"], kwargs["img_ids"]
        self._order_for(img_ids, hidden.shape[1])
        ids2d = img_ids[0] if img_ids.ndim == 3 else img_ids
        kwargs = dict(kwargs, hidden_states=hidden[:, self.perm], img_ids=ids2d[self.perm])
        return args, kwargs

    def post_hook(self, module, args, kwargs, output):
        if isinstance(output, tuple):
            return (output[0][:, self.inverse], *output[1:])
        output.sample = output.sample[:, self.inverse]
        return output


# --- PyTorch reference: attention ------------------------------------------------------------------

def attention_column_sums(q: torch.Tensor, k: torch.Tensor, group: int, heads_per_chunk: int = 4) -> torch.Tensor:
    """Per query group of `group` rows, the column sums of softmax(q k^T / sqrt(d)): (B, H, G, L_k) float32.
    q, k: (B, L, H, D). Computed a few heads at a time to bound memory."""
    B, Lq, H, D = q.shape
    G = math.ceil(Lq / group)
    out = torch.empty(B, H, G, k.shape[1], device=q.device, dtype=torch.float32)
    for h0 in range(0, H, heads_per_chunk):
        qh = q[:, :, h0:h0 + heads_per_chunk].transpose(1, 2).float()
        kh = k[:, :, h0:h0 + heads_per_chunk].transpose(1, 2).float()
        p = torch.softmax(qh @ kh.transpose(-1, -2) * D ** -0.5, dim=-1)
        p = F.pad(p, (0, 0, 0, G * group - Lq))  # zero rows: the last group may be partial
        out[:, h0:h0 + heads_per_chunk] = p.unflatten(2, (G, group)).sum(3)
    return out


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_index: torch.Tensor,
                               group: int, o_cache: torch.Tensor | None = None,
                               dense_out: torch.Tensor | None = None) -> torch.Tensor:
    """A_S: attention of each query group over its own key columns only (softmax renormalised within S),
    plus `o_cache` when given (a sparse step), or subtracted from `dense_out` (a dense step's new o_cache, rounded
    once). q, k, v, o_cache, dense_out: (B, L, H, D); key_index: (B, H, G, K) int. Output q's dtype."""
    B, Lq, H, D = q.shape
    G, K = key_index.shape[2], key_index.shape[3]
    qg = F.pad(q.transpose(1, 2).float(), (0, 0, 0, G * group - Lq)).unflatten(2, (G, group))  # B,H,G,group,D
    flat = key_index.reshape(B, H, G * K, 1).long().expand(-1, -1, -1, D)
    ks = torch.gather(k.transpose(1, 2).float(), 2, flat).view(B, H, G, K, D)
    vs = torch.gather(v.transpose(1, 2).float(), 2, flat).view(B, H, G, K, D)
    p = torch.softmax(qg @ ks.transpose(-1, -2) * D ** -0.5, dim=-1)
    out = (p @ vs).flatten(2, 3)[:, :, :Lq].transpose(1, 2)  # B, L, H, D
    if o_cache is not None:
        out = out + o_cache.float()
    if dense_out is not None:
        out = dense_out.float() - out
    return out.to(q.dtype)


def select_key_columns(column_sums: torch.Tensor, count: int) -> torch.Tensor:
    """Top-`count` key columns per (batch, head, group), sorted ascending (memory order): (B, H, G, count) int32."""
    return top_ascending(column_sums, count)


def top_ascending(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest entries along the last dim, ascending (memory order), int32. On the Triton
    path one kernel launch (utils.chipmunk_triton.top_ascending); here torch.topk, then a sort of the indices."""
    triton_ops = _kernels_for(scores)
    if triton_ops is not None and scores.shape[-1] <= triton_ops.TOP_ASCENDING_MAX_ROW:
        return triton_ops.top_ascending(scores, count)
    return scores.topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)


def top_and_random(scores: torch.Tensor, top: int, total: int, seed: torch.Tensor | int,
                   reference: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The `top` largest entries along the last dim plus `total - top` others at random (the highest of a
    hashed_uniform noise draw), indices ascending, int32: Chipmunk's neuron set with its random keys. With
    `reference` (float32), of |scores - reference| (scores widened to float32 first). `out`: an int32 buffer of the
    result's shape to write into. One kernel launch on the Triton path (utils.chipmunk_triton.top_and_random)."""
    triton_ops = _kernels_for(scores)
    if triton_ops is not None and scores.shape[-1] <= triton_ops.TOP_ASCENDING_MAX_ROW:
        return triton_ops.top_and_random(scores, top, total, seed, reference=reference, out=out)
    if reference is not None:
        scores = (scores.float() - reference).abs()
    index = _top_and_random_reference(scores, top, total, seed)
    return index if out is None else out.copy_(index)


def _top_and_random_reference(scores: torch.Tensor, top: int, total: int, seed: torch.Tensor | int) -> torch.Tensor:
    index = top_ascending(scores, top)
    if total == top:
        return index
    # The top set scores 2 > any noise in [0, 1), so one more selection takes it and the random keys.
    noise = hashed_uniform(scores.shape, seed, scores.device)
    return top_ascending(noise.scatter_(-1, index.long(), 2.0), total)


# --- PyTorch reference: MLP ------------------------------------------------------------------------

def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def neuron_major(act: torch.Tensor) -> torch.Tensor:
    """The same (B, L, hidden) values stored hidden-major: a neuron's tokens are contiguous, so the sparse steps'
    per-block gathers of selected neurons read whole runs (the Triton kernel's fast layout)."""
    return act.transpose(1, 2).contiguous().transpose(1, 2)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of `block` consecutive tokens (the last one may be partial): (B, nb, d) float32."""
    B, L, d = x.shape
    nb = math.ceil(L / block)
    padded = F.pad(x, (0, 0, 0, nb * block - L)) if L % block else x  # FLUX sizes are whole blocks: no copy
    # Summed in float32 without a float32 copy of x (a dense MLP step's pre-activations: 214 MB at 1280x768).
    sums = padded.view(B, nb, block, d).sum(2, dtype=torch.float32)
    return sums / block_sizes(L, block, x.device)[None, :, None]


@functools.lru_cache(maxsize=32)
def block_sizes(length: int, block: int, device: torch.device | str) -> torch.Tensor:
    """Tokens in each block of `block` (the last may be partial), float32; made once per shape (read-only for
    callers), on the device: setting `counts[-1] = ...` on a CUDA tensor copies a host scalar, and that
    synchronized the stream once per layer."""
    starts = torch.arange(0, length, block, device=device)
    return (length - starts).clamp(max=block).float()


def sparse_mlp_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                         neuron_index: torch.Tensor, act_cache: torch.Tensor, out_cache: torch.Tensor,
                         block: int) -> torch.Tensor:
    """One sparse MLP step, in place on the caches; returns the fc1 pre-activations of the selected
    neurons, (B, nb, block, K) float32, for the caller's bookkeeping.

    For each token block b with neuron set S_b:
        act_S = gelu(x_b W1[S_b]^T + b1[S_b]);  out_cache_b += (act_S - act_cache_b[:, S_b]) W2[:, S_b]^T;
        act_cache_b[:, S_b] = act_S.
    x: (B, L, d); w1: (hidden, d); b1: (hidden,); w2: (out, hidden) (nn.Linear layouts);
    neuron_index: (B, nb, K); act_cache: (B, L, hidden); out_cache: (B, L, out) float32.
    """
    B, L, d = x.shape
    nb, K = neuron_index.shape[1], neuron_index.shape[2]
    pad = nb * block - L
    idx = neuron_index.long()
    xb = F.pad(x.float(), (0, 0, 0, pad)).view(B, nb, block, d)
    pre = xb @ w1.float()[idx].transpose(-1, -2) + b1.float()[idx][:, :, None, :]  # B, nb, block, K
    # Rounded to the cache's dtype first, so that the deltas telescope: out_cache stays act_cache @ W2^T.
    act = gelu_tanh(pre).to(act_cache.dtype)
    cache_blocks = F.pad(act_cache, (0, 0, 0, pad)).view(B, nb, block, -1)
    gather_idx = idx[:, :, None, :].expand(-1, -1, block, -1)
    delta = act.float() - torch.gather(cache_blocks, 3, gather_idx).float()
    w2s = w2.float().t()[idx]  # B, nb, K, out
    out_cache += (delta @ w2s).flatten(1, 2)[:, :L]
    cache_blocks.scatter_(3, gather_idx, act)
    act_cache.copy_(cache_blocks.flatten(1, 2)[:, :L])
    return pre


# --- backends --------------------------------------------------------------------------------------

def _kernels_for(t: torch.Tensor):
    """The Triton kernels for tensors like `t`, or None for the reference path. CPU tensors take the kernels only
    with CHIPMUNK_BACKEND=triton under TRITON_INTERPRET=1: how the tests run the layers' kernel path without a GPU."""
    if t.is_cuda or os.environ.get("CHIPMUNK_BACKEND", "").lower() == "triton":
        return _triton_backend()
    return None


def _triton_backend():
    """utils.chipmunk_triton when it can serve CUDA tensors, else None (reference path)."""
    if os.environ.get("CHIPMUNK_BACKEND", "").lower() == "reference":
        return None
    try:
        from utils import chipmunk_triton
    except Exception:  # noqa: BLE001 - reported by backend_status()
        return None
    return chipmunk_triton if chipmunk_triton.TRITON_AVAILABLE else None


def backend_status(device: torch.device) -> str:
    if device.type != "cuda":
        if _kernels_for(torch.empty(0, device=device)) is not None:
            return "Triton kernels (CHIPMUNK_BACKEND=triton: interpreted on CPU, slowly)"
        return "PyTorch reference (CPU)"
    if os.environ.get("CHIPMUNK_BACKEND", "").lower() == "reference":
        return "PyTorch reference (CHIPMUNK_BACKEND=reference)"
    try:
        from utils import chipmunk_triton
    except Exception as e:  # noqa: BLE001
        return f"PyTorch reference (SLOW: utils.chipmunk_triton failed to import: {type(e).__name__}: {e})"
    if not chipmunk_triton.TRITON_AVAILABLE:
        return f"PyTorch reference (SLOW: Triton unavailable: {chipmunk_triton.UNAVAILABLE_REASON})"
    return "Triton kernels"


def hashed_uniform(shape: tuple[int, ...], seed: torch.Tensor | int, device: torch.device | str) -> torch.Tensor:
    """Uniform floats in [0, 1), float32, from a counter-based hash (splitmix64) of (seed, position): the same
    numbers for the same seed on any device, and safe in a CUDA graph, where `seed` may be a device tensor that
    changes between replays (a torch.Generator's seed would be frozen at capture)."""
    z = torch.arange(1, math.prod(shape) + 1, device=device, dtype=torch.int64)
    # int64 arithmetic wraps, as the hash wants; an int seed stays on the host (a tensor made of it would be a copy)
    offset = seed.long() * _SEED_MIX if isinstance(seed, torch.Tensor) else hash_offset(seed)
    z = (z + offset) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 40).float() * 2.0 ** -24).view(shape)  # the top 24 bits: exact in float32


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_SEED_MIX = 0x632BE59BD9B4E019
HASH_CONSTANTS = (_SEED_MIX, _GOLDEN, _MIX1, _MIX2)  # as signed int64, for the Triton kernel


def hash_offset(seed: int) -> int:
    """hashed_uniform's seed term, seed * _SEED_MIX wrapped to signed int64."""
    return _signed64(seed * _SEED_MIX % (1 << 64))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


# --- schedule --------------------------------------------------------------------------------------

def attn_dense_step(step: int, config: AttnConfig) -> bool:
    if config.full_step_schedule is not None:
        return step in set(config.full_step_schedule)
    return step < 2 or step % config.full_step_every == 0


def mlp_dense_step(step: int, config: MlpConfig) -> bool:
    return step % config.full_step_every == 0


def mlp_reselect_step(step: int, config: MlpConfig) -> bool:
    """The first sparse step after each dense step, then every `block_mask_cache` steps."""
    since_dense = step % config.full_step_every
    return since_dense >= 1 and (since_dense - 1) % config.block_mask_cache == 0


def due_since(last_step: int | None, step: int, scheduled) -> bool:
    """Whether `scheduled(t)` holds for a step t in (last_step, step]: a refresh that fell on a step this
    layer did not compute (a feature-cache forecast step) is carried out on the next one it computes."""
    if last_step is None:
        return True
    return any(scheduled(t) for t in range(last_step + 1, step + 1))


class LayerState:
    """One sparse layer's caches and its own record of the last step it computed (a step index from
    the scheduler, never a call count). Reset at the first step of every generation.

    The caches are persistent buffers, one set per input shape, written in place once they exist (`store`): a
    CUDA graph of a step (ChipmunkStepGraphs) records the buffers' addresses, so a cache must never be re-bound to
    a new tensor. A new generation keeps the buffers and resets only the flags that say what they hold."""

    def __init__(self, name: str, index: int, clock: StepClock):
        self.name, self.index, self.clock = name, index, clock
        self.last_step: int | None = None
        self.buffers: dict[tuple, dict[str, torch.Tensor]] = {}  # shape key -> caches
        self.tensors: dict[str, torch.Tensor] = {}  # the current shape's caches
        self.shape_key: tuple | None = None
        self.flags: dict[str, bool] = {}  # what the caches hold this generation (e.g. "keys": a key set)
        self.stats = {"dense": 0, "sparse": 0, "reselect": 0}

    def begin(self, shape_key: tuple) -> tuple[int, int | None]:
        """(step now, last step computed) after resetting on a new generation or a new shape."""
        step = self.clock.step
        if self.clock.at_first_step or shape_key != self.shape_key:
            self.last_step, self.flags, self.shape_key = None, {}, shape_key
            self.tensors = self.buffers.setdefault(shape_key, {})
        elif self.last_step is not None and step <= self.last_step:
            raise RuntimeError(f"Chipmunk {self.name}: called twice at step {step} (true CFG / batched "
                               f"conditioning runs are not supported with Chipmunk's per-step caches)")
        return step, self.last_step

    def store(self, name: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Write `value` into the cache `name` in place, converting to the buffer's dtype in the same pass. On first
        use the buffer is a copy of `value` in `dtype` (default: value's): never `value` itself, which the caller
        may hand out."""
        dtype = dtype or value.dtype
        buffer = self.buffer(name, value.shape, dtype)
        if buffer is None:
            self.tensors[name] = value.to(dtype, copy=True)
            return self.tensors[name]
        return buffer.copy_(value)

    def buffer(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """The cache `name` if it exists with this shape and dtype (to be written in place), else None."""
        buffer = self.tensors.get(name)
        return buffer if buffer is not None and buffer.shape == shape and buffer.dtype == dtype else None


_LAYERS: dict[int, "weakref.ReferenceType"] = {}


def _register(layer) -> torch.Tensor:
    """The layer's id as a CPU int64 scalar tensor, which torch.compile passes in as a graph input. A Python int
    would be guarded by value: regional compile would retrace the block once per layer (57 on FLUX), past
    dynamo's recompile limit."""
    layer_id = len(_LAYERS)
    _LAYERS[layer_id] = weakref.ref(layer)
    return torch.tensor(layer_id, dtype=torch.int64)


def _layer(layer_id: torch.Tensor):
    layer = _LAYERS[int(layer_id)]()
    if layer is None:
        raise RuntimeError(f"Chipmunk layer {int(layer_id)} was freed")
    return layer


# --- sparse attention layer ------------------------------------------------------------------------

class SparseAttentionLayer:
    def __init__(self, index: int, clock: StepClock, config: AttnConfig, dense_attention):
        self.state = LayerState(f"attention layer {index}", index, clock)
        self.config, self.dense_attention = config, dense_attention
        self.mlp_beside: SparseMlpLayer | None = None  # a single block's sparse MLP (same input): selects ahead
        self.id = _register(self)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 block_input: torch.Tensor | None = None) -> torch.Tensor:
        beside = self.mlp_beside if block_input is not None else None
        if beside is not None and not beside.runs_ahead:  # (one that runs ahead started before the projections)
            beside.select_ahead(block_input)  # its neuron selection, on a side stream beside the attention below
        s, cfg = self.state, self.config
        step, last = s.begin((tuple(q.shape), q.dtype, q.device))
        triton_ops = _kernels_for(q)
        dense = due_since(last, step, lambda t: attn_dense_step(t, cfg))
        if dense:
            out, lse = self.dense_attention(q, k, v)
            if lse is not None and not (triton_ops and _attention_lse_trusted(q, k, lse, triton_ops)):
                lse = None
            if cfg.recompute_mask or not s.flags.get("keys"):
                count = rounded_count(cfg.top_keys, k.shape[1], cfg.counts_multiple_of)
                colsums = (triton_ops.attention_column_sums(q, k, cfg.mbm, lse) if triton_ops
                           else attention_column_sums(q, k, cfg.mbm))
                s.store("key_index", select_key_columns(colsums, count))
                s.flags["keys"] = True
            # o_cache = O_dense - A_S in one pass (A_S never written), in place once the buffer exists; in the
            # output's dtype, like the output it corrects.
            o_cache = s.buffer("o_cache", out.shape, out.dtype)
            s.tensors["o_cache"] = self._sparse(triton_ops, q, k, v, dense_out=out, into=o_cache)
            s.stats["dense"] += 1
        else:
            out = self._sparse(triton_ops, q, k, v, o_cache=s.tensors["o_cache"])
            s.stats["sparse"] += 1
        if beside is not None:
            beside.release_input()  # after the attention's kernels, which run beside the MLP's fc1
        s.last_step = step
        return out

    def _sparse(self, triton_ops, q, k, v, o_cache=None, dense_out=None, into=None):
        index = self.state.tensors["key_index"]
        if triton_ops:
            return triton_ops.sparse_attention(q, k, v, index, self.config.mbm, o_cache, dense_out, out=into)
        result = sparse_attention_reference(q, k, v, index, self.config.mbm, o_cache, dense_out)
        return result if into is None else into.copy_(result)


_ATTENTION_LSE_TRUSTED: bool | None = None  # decided at the first dense attention step of the process


def attention_lse_matches(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, triton_ops) -> bool:
    """Whether `lse` (as the dense attention kernel returned it) is the rows' natural-log log-sum-exp of the scaled
    scores, within float32-from-bf16 noise, against the Triton row pass. One host sync."""
    reference = triton_ops.row_lse_log2(q, k) / math.log2(math.e)
    return lse.shape == reference.shape and float((lse.float() - reference).abs().max()) < 1e-2


def _attention_lse_trusted(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, triton_ops) -> bool:
    """Check FA3's log-sum-exp once per process (on the first dense step, which runs eagerly, never inside a CUDA
    graph capture); if it is not what the column sums assume, say so and compute it instead from then on."""
    global _ATTENTION_LSE_TRUSTED
    if _ATTENTION_LSE_TRUSTED is None:
        _ATTENTION_LSE_TRUSTED = attention_lse_matches(q, k, lse, triton_ops)
        if not _ATTENTION_LSE_TRUSTED:
            print("[chipmunk] WARNING: the dense attention's log-sum-exp does not match the rows' log-sum-exp; the "
                  "column sums compute their own (one more pass over the keys per dense step)", flush=True)
    return _ATTENTION_LSE_TRUSTED


@torch.library.custom_op("flux_harness::chipmunk_attention", mutates_args=())
def chipmunk_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: torch.Tensor,
                          block_input: torch.Tensor | None = None) -> torch.Tensor:
    """Opaque to torch.compile: the per-step dense/sparse decision and the caches stay in Python. Contiguous, as
    the fake says: compiled code after the op is traced for those strides (the reference path's are not).
    `block_input`: a single block's normalised input, which its sparse MLP reads beside the attention (an input of
    the op, so compiled code keeps it alive until the op has waited for the MLP's reads)."""
    return _layer(layer_id)(q, k, v, block_input).contiguous()


@chipmunk_attention_op.register_fake
def _(q, k, v, layer_id, block_input=None):
    return torch.empty_like(q)


@torch.library.custom_op("flux_harness::chipmunk_mlp_start", mutates_args=("x",))
def chipmunk_mlp_start_op(x: torch.Tensor, layer_id: torch.Tensor) -> None:
    """Starts a single block's MLP step from its normalised input x, before the attention's projections: on a side
    stream beside them once its kernels are tuned. x is declared mutated (it is only read) so that compiled code,
    whose scheduler would otherwise move this op down to the attention op, keeps it ahead of every later reader of x:
    the QKV projection first. The attention op waits until the MLP has read x; proj_out joins its output."""
    _layer(layer_id).select_ahead(x)


class ChipmunkAttnProcessor(FluxKernelAttnProcessor):
    """FLUX joint attention with Chipmunk's sparse deltas in place of the attention kernel."""

    def __init__(self, layer: SparseAttentionLayer):
        self.layer = layer

    def begin(self, block_input: torch.Tensor) -> None:
        mlp = self.layer.mlp_beside
        if mlp is not None and mlp.runs_ahead:
            chipmunk_mlp_start_op(block_input, mlp.id)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               block_input: torch.Tensor | None = None) -> torch.Tensor:
        if self.layer.mlp_beside is None:
            block_input = None
        return chipmunk_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), self.layer.id, block_input)


def _dense_attention_like(processor):
    """The dense kernel the stack chose in step 2 (FA3, FA3 fp8, or SDPA), for Chipmunk's dense steps: returns
    (output, the rows' log-sum-exp or None). bf16 FA3 gives the log-sum-exp for free, which spares the column sums
    their first pass; fp8 FA3's comes from fp8 scores, so it is not used for the bf16 column sums."""
    if isinstance(processor, FA3FluxAttnProcessor):
        if processor.fp8:
            return lambda q, k, v: (fa3_fp8_attention(q, k, v), None)
        return fa3_attention_with_lse
    return lambda q, k, v: (F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).contiguous(), None)


# --- sparse MLP layer ------------------------------------------------------------------------------

# A single block's MLP input is its attention's input too, so its work can start before the attention: on a side
# stream, beside the attention. SELECT_AHEAD_ON_SIDE_STREAM False (CHIPMUNK_SELECT_AHEAD_STREAM=main): that work runs
# on the current stream instead (the device check's reference).
# MLP_AHEAD (the default, CHIPMUNK_MLP_AHEAD=1; =0 off), read when Chipmunk is applied: a single block's whole MLP
# step starts before its attention's projections (`chipmunk_mlp_start_op`, `SparseMlpLayer.runs_ahead`) and proj_out
# joins it; the block's concat then carries no MLP input (`NoColumns`). On the H200 the MLP beside the attention gave
# 1.348x against 1.32x end to end (session 15); the concat's MLP half cost two copies of the normalised input per
# block (written into the concat, copied out for the MLP's call). Off, the MLP runs in proj_out's call and only its
# neuron selection starts beside the attention (in the attention op).
SELECT_AHEAD_ON_SIDE_STREAM = os.environ.get("CHIPMUNK_SELECT_AHEAD_STREAM", "side").lower() != "main"
_MLP_AHEAD_SETTING = os.environ.get("CHIPMUNK_MLP_AHEAD", "1")
if _MLP_AHEAD_SETTING not in ("0", "1"):
    raise ValueError(f"CHIPMUNK_MLP_AHEAD={_MLP_AHEAD_SETTING!r}: one of 1 (default), 0")
MLP_AHEAD = _MLP_AHEAD_SETTING == "1"


class SparseMlpLayer:
    """fc1 -> GELU(tanh) -> fc2 with Chipmunk's per-token-block neuron deltas. `b2` may be None (single
    blocks, where linear2's bias is added once by the attention-output part)."""

    def __init__(self, index: int, clock: StepClock, config: MlpConfig, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor | None):
        self.state = LayerState(f"MLP layer {index}", index, clock)
        self.config, self.w1, self.b1, self.w2, self.b2 = config, w1, b1, w2, b2
        self.w2_t: torch.Tensor | None = None  # (hidden, out) copy for the Triton kernel's row gathers
        self.selected_ahead_at: int | None = None  # the step whose neurons select_ahead chose (None: not ahead)
        self.output_ahead: tuple[int, torch.Tensor] | None = None  # (step, output) of an MLP step run ahead
        self.runs_ahead = False  # set by apply_chipmunk_config: every step starts ahead (x never reaches __call__)
        self.input_read: torch.cuda.Event | None = None  # recorded on the side stream once it no longer reads x
        self.side_stream: torch.cuda.Stream | None = None
        self.id = _register(self)

    def _due(self, last: int | None, step: int) -> tuple[bool, bool]:
        """(dense step, reselection due) for this layer now."""
        cfg, s = self.config, self.state
        dense = due_since(last, step, lambda t: mlp_dense_step(t, cfg))
        return dense, not dense and (not s.flags.get("neurons") or
                                     due_since(last, step, lambda t: mlp_reselect_step(t, cfg)))

    def _side(self, device: torch.device) -> torch.cuda.Stream | None:
        """The side stream to start work on beside the attention (made ready to follow the current stream's work so
        far), or None to run it in place (CPU, or CHIPMUNK_SELECT_AHEAD_STREAM=main)."""
        if device.type != "cuda" or not SELECT_AHEAD_ON_SIDE_STREAM:
            return None
        if self.side_stream is None or self.side_stream.device != device:
            self.side_stream = torch.cuda.Stream(device, priority=-1)  # first: its blocks take free SMs
        self.side_stream.wait_stream(torch.cuda.current_stream(device))
        return self.side_stream

    def _join_side(self, x: torch.Tensor) -> None:
        """The current stream waits for the work started on the side stream (nothing to join on CPU)."""
        if self.side_stream is not None and x.is_cuda:
            torch.cuda.current_stream(x.device).wait_stream(self.side_stream)

    def select_ahead(self, x: torch.Tensor) -> None:
        """Called with the attention's input before the attention runs. A layer that `runs_ahead` (called before the
        projections) runs its whole MLP step here (`_run_ahead`): on the side stream once its sparse kernels have run
        (and tuned) with nothing beside them, in place before that. Otherwise (called by the attention op), only
        the neuron selection (a small matmul and a latency-bound search over 36 rows: the search 65 us on the H200),
        instead of after the attention on the stream's critical path; `__call__` joins it. The block means are taken
        on the current stream into a persistent buffer, so the side stream's selection reads only this layer's own
        buffers (never `x`, whose memory compiled code may reuse once the attention op returns). The same decisions
        and numbers as in `__call__`; on CPU it runs in place."""
        s = self.state
        self.output_ahead = None
        step, last = s.begin(self._shape_key(x))
        if self.runs_ahead:
            self._run_ahead(x, step, last, beside=s.stats["sparse"] > 0)
            return
        if not self._due(last, step)[1]:  # no reselection due
            return
        means = s.store("x_block_means", block_means(x.contiguous(), self.config.bm))
        side = self._side(x.device)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            self._reselect(means, step, self.w1.shape[0])
        self.selected_ahead_at = step

    def _run_ahead(self, x: torch.Tensor, step: int, last: int | None, beside: bool) -> None:
        """This step's MLP, on the side stream beside the attention's projections, the attention and its output
        projection if `beside` (else in place). The output is allocated on the current stream (whose later work
        reads and frees it). Compiled code may reuse x's memory once the attention op returns, so the op ends with
        `release_input`: the current stream waits there until the side stream has read x (fc1)."""
        output = x.new_empty(*x.shape[:-1], self.w2.shape[0])
        side = self._side(x.device) if beside else None
        if side is None:
            self._step(x, step, last, output)
        else:
            self.input_read = torch.cuda.Event()
            with torch.cuda.stream(side):
                self._step(x, step, last, output, self.input_read)
        self.output_ahead = (step, output)

    def release_input(self) -> None:
        """Called by the attention op after its own kernels: the current stream waits until the MLP running ahead
        no longer reads the attention's input (a no-op when nothing runs ahead on the side stream)."""
        if self.input_read is not None:
            torch.cuda.current_stream().wait_event(self.input_read)
            self.input_read = None

    @staticmethod
    def _shape_key(x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.dtype, x.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output for this step: the one run ahead (joined here), or computed now from x. A layer that runs
        ahead gets the attention's output as x (only its shape is read): its input never reaches here."""
        if self.output_ahead is not None:  # run ahead beside the attention: join the side stream, hand it out
            step, output = self.output_ahead
            self.output_ahead = None
            self._join_side(x)  # even if stale (an interrupted forward)
            if step == self.state.clock.step and output.shape[:-1] == x.shape[:-1]:
                return output
        if self.runs_ahead:
            raise RuntimeError(f"Chipmunk {self.state.name}: starts in its block's attention processor, which did not "
                               f"run at step {self.state.clock.step} (a block's proj_out called on its own?)")
        step, last = self.state.begin(self._shape_key(x))
        return self._step(x, step, last)

    def _step(self, x: torch.Tensor, step: int, last: int | None, output: torch.Tensor | None = None,
              x_read: torch.cuda.Event | None = None) -> torch.Tensor:
        """This step's MLP (dense, or sparse with a reselection when due) into `output` if given (else a new tensor);
        `x_read` is recorded on the current stream once no kernel reads x any more."""
        s, cfg = self.state, self.config
        triton_ops = _kernels_for(x)
        hidden = self.w1.shape[0]
        dense, reselect = self._due(last, step)
        if self.selected_ahead_at is not None:  # join the side stream (a stale one: an interrupted forward)
            self._join_side(x)
            reselect = reselect and self.selected_ahead_at != step
            self.selected_ahead_at = None
        if dense:
            act, pre_mean = self._dense_fc1(x, triton_ops)
            if x_read is not None:
                x_read.record()
            # The output is fc2's in x's dtype: the float32 cache holds the same values, so it is not read back.
            result = F.linear(act, self.w2, self.b2).to(x.dtype)
            output = result if output is None else output.copy_(result)
            s.store("out_cache", result, dtype=torch.float32)
            s.store("pre_mean", pre_mean)  # the reference the change is measured against
            s.flags["neurons"] = False  # a neuron set is chosen against the new reference
            s.stats["dense"] += 1
        else:
            if reselect:
                self._reselect(block_means(x, cfg.bm), step, hidden)
            index = s.tensors["neuron_index"]
            if triton_ops:
                if self.w2_t is None or self.w2_t.device != x.device:
                    self.w2_t = self.w2.t().contiguous()
                # A new tensor every call (never the cache itself: a compiled graph could reuse a handed-out
                # cache's buffer for later temporaries), written by fc2's epilogue.
                if output is None:
                    output = torch.empty(s.tensors["out_cache"].shape, dtype=x.dtype, device=x.device)
                # The selected neurons' caches are fresh now: their next change is measured from the block means
                # of these pre-activations, which the kernels write into pre_mean.
                triton_ops.sparse_mlp(x, self.w1, self.b1, self.w2_t, index, s.tensors["act_cache"],
                                      s.tensors["out_cache"], cfg.bm, out=output, pre_mean=s.tensors["pre_mean"],
                                      x_read=x_read)
            else:
                pre = sparse_mlp_reference(x, self.w1, self.b1, self.w2, index, s.tensors["act_cache"],
                                           s.tensors["out_cache"], cfg.bm)
                if x_read is not None:
                    x_read.record()
                s.tensors["pre_mean"].scatter_(2, index.long(), self._selected_block_means(pre, x.shape[1]))
                # Always a new tensor, even in the cache's dtype: handing out the cache itself would let a compiled
                # graph reuse its buffer for later temporaries (inductor's buffer reuse) and corrupt it.
                cache = s.tensors["out_cache"]
                output = cache.to(x.dtype, copy=True) if output is None else output.copy_(cache)
            s.stats["sparse"] += 1
        s.last_step = step
        return output

    def _dense_fc1(self, x: torch.Tensor, triton_ops=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A dense step's fc1 + GELU, computed transposed: (B, hidden, L) = W1 x^T is the activation cache's
        neuron-major storage itself (the layout the sparse kernels gather fast), so GELU writes the cache in one
        pass. (Computing it token-major and copying it into the neuron-major cache took a transposing copy of
        ~0.35 ms per layer: 19.6 ms of a dense step on the H200, results/NOTES.md session 8.) With the kernels, the
        bias, GELU and block means are one pass (`dense_mlp_epilogue`); torch's ops, the reference path, take three.
        Returns the cache (the token-major view, as `neuron_major` gives) and the block means of the
        pre-activations."""
        s = self.state
        # B, hidden, L; cuBLAS reads x transposed. Detached: with a weight that requires grad (a Parameter, even
        # under no_grad) matmul folds 2-D @ 3-D into one mm and copies its transposed result (the H200 trace showed
        # the same 0.35 ms copy per layer as before).
        pre_t = torch.matmul(self.w1.detach(), x.transpose(1, 2))
        cache = s.tensors.get("act_cache")
        if cache is None or cache.shape != pre_t.transpose(1, 2).shape or cache.dtype != pre_t.dtype:
            cache = s.tensors["act_cache"] = torch.empty_like(pre_t).transpose(1, 2)
        # Written in place from here on: a step graph holds the buffer's address.
        if triton_ops:
            return cache, triton_ops.dense_mlp_epilogue(pre_t, self.b1.detach(), cache.transpose(1, 2), self.config.bm)
        pre_t += self.b1.detach()[:, None]  # (GELU's out= below takes no tensor that requires grad)
        torch.ops.aten.gelu.out(pre_t, approximate="tanh", out=cache.transpose(1, 2))
        return cache, block_means(pre_t.transpose(1, 2), self.config.bm)

    def _selected_block_means(self, pre: torch.Tensor, length: int) -> torch.Tensor:
        B, nb, block, K = pre.shape
        rows = torch.arange(nb * block, device=pre.device).view(nb, block) < length  # padded rows excluded
        return (pre * rows[None, :, :, None]).sum(2) / rows.sum(1)[None, :, None]

    def _reselect(self, x_means: torch.Tensor, step: int, hidden: int) -> None:
        """Per token block: the top_keys neurons whose fc1 pre-activation block mean moved most since their
        cache was last refreshed, plus random_keys others. fc1 is linear, so the block mean of the
        pre-activation is fc1 of the block mean of x (`x_means`, block_means(x)): one small matmul instead of a
        dense fc1."""
        s, cfg = self.state, self.config
        now = F.linear(x_means.to(self.w1.dtype), self.w1, self.b1)  # B, nb, hidden
        total = rounded_count(cfg.top_keys + cfg.random_keys, hidden, cfg.counts_multiple_of)
        top = min(total, int(round(cfg.top_keys * hidden)))
        # Deterministic per (layer, step), so runs that compute the same steps draw the same random neurons, on any
        # device, eager or replayed from a CUDA graph (where the step is a device tensor the replays update).
        step_value = s.clock.step_tensor if s.clock.step_tensor is not None else step
        # Ranked by |now - pre_mean| (in float32) and written into the index buffer, in the selection's one launch.
        into = s.buffer("neuron_index", (*now.shape[:-1], total), torch.int32)
        s.tensors["neuron_index"] = top_and_random(now, top, total, 1_000_003 * (s.index + 1) + step_value,
                                                   reference=s.tensors["pre_mean"], out=into)
        s.flags["neurons"] = True
        s.stats["reselect"] += 1


@torch.library.custom_op("flux_harness::chipmunk_mlp", mutates_args=())
def chipmunk_mlp_op(x: torch.Tensor, layer_id: torch.Tensor, out_features: int) -> torch.Tensor:
    """Opaque to torch.compile, like chipmunk_attention_op."""
    return _layer(layer_id)(x)


@chipmunk_mlp_op.register_fake
def _(x, layer_id, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class ChipmunkFeedForward(torch.nn.Module):
    """Replaces a double block's image `ff` (same name, same role: returns the MLP output with fc2's bias).
    Holds the weights as its own parameters, so float8 quantization (which targets nn.Linear) leaves the
    sparse gathers on bf16 weights."""

    def __init__(self, ff: torch.nn.Module, layer: SparseMlpLayer):
        super().__init__()
        self.w1, self.b1 = ff.net[0].proj.weight, ff.net[0].proj.bias
        self.w2, self.b2 = ff.net[2].weight, ff.net[2].bias
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return chipmunk_mlp_op(hidden_states, self.layer.id, self.w2.shape[0])


class PassThrough(torch.nn.Module):
    """Stands in for a single block's `proj_mlp` and `act_mlp`: the normalised input travels to `proj_out`
    (through the block's own concat), which computes the sparse MLP from it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class NoColumns(torch.nn.Module):
    """Stands in for a single block's `proj_mlp` when its MLP starts in the attention processor: no columns, so the
    block's concat is the attention output alone (the normalised input is neither copied into it nor out of it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :0]


class ChipmunkSingleProjOut(torch.nn.Module):
    """A single block's `proj_out` (linear2) split into the attention-output part and the MLP's fc2.
    Input: cat([attention output (dim), normalised block input (dim)]), or the attention output alone when the MLP
    started in the attention processor (NoColumns); output: the block's pre-gate feature
    = attn @ Wa^T + bias + MLP(x) with linear2's bias added ONCE (Chipmunk's reference adds it in both halves)."""

    def __init__(self, proj_out: torch.nn.Linear, proj_mlp: torch.nn.Linear, layer_index: int, clock: StepClock,
                 config: MlpConfig):
        super().__init__()
        dim = proj_out.out_features
        self.dim = dim
        # The attention-output part stays an nn.Linear (with linear2's bias, added once), so the float8 layer
        # quantizes it like every other dense projection; only fc2's half is held for the sparse gathers.
        self.attn_out = torch.nn.Linear(dim, dim, bias=proj_out.bias is not None, device="meta")  # no init: replaced
        self.attn_out.weight = torch.nn.Parameter(proj_out.weight[:, :dim].detach(), requires_grad=False)
        if proj_out.bias is not None:
            self.attn_out.bias = proj_out.bias
        self.w1, self.b1 = proj_mlp.weight, proj_mlp.bias
        self.w2 = torch.nn.Parameter(proj_out.weight[:, dim:].detach(), requires_grad=False)
        self.layer = SparseMlpLayer(layer_index, clock, config, self.w1, self.b1, self.w2, None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] == self.dim:  # the attention output alone: the MLP started before the attention
            attn_output = x = hidden_states  # the op reads only x's shape, and waits for the MLP's side stream
        else:
            attn_output, x = hidden_states.split([self.dim, hidden_states.shape[-1] - self.dim], dim=-1)
            x = x.contiguous()
        # The output projection first: its matmul runs while the MLP may still run on the side stream.
        attended = self.attn_out(attn_output)
        return attended + chipmunk_mlp_op(x, self.layer.id, self.dim)


# --- applying it to a FLUX pipeline ----------------------------------------------------------------

def apply_chipmunk(pipeline, args) -> str:
    """Layer 3 of optimize(): sparse attention and MLP deltas on the FLUX transformer, token reorder hooks.
    Returns the stack's status line."""
    config = load_chipmunk_config(args.chipmunk_config, height=args.height, width=args.width,
                                  pixels_per_token=getattr(pipeline, "vae_scale_factor", 8) * 2)
    return apply_chipmunk_config(pipeline, config)


def apply_chipmunk_config(pipeline, config: ChipmunkConfig) -> str:
    transformer = pipeline.transformer
    clock = StepClock(pipeline.scheduler)
    doubles, singles = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    layers = []  # every sparse layer, for the step graphs (utils/chipmunk_graphs.py)
    for index, block in enumerate(doubles + singles):
        is_double = index < len(doubles)
        if config.attn.is_enabled and index >= config.attn.first_n_dense_layers:
            layer = SparseAttentionLayer(index, clock, config.attn, _dense_attention_like(block.attn.processor))
            block.attn.set_processor(ChipmunkAttnProcessor(layer))
            layers.append(layer)
        if config.mlp.is_enabled and index >= config.mlp.first_n_dense_layers:
            if is_double:  # image MLP sparse; the text MLP (ff_context) stays dense
                ff = block.ff
                block.ff = ChipmunkFeedForward(ff, SparseMlpLayer(index, clock, config.mlp, ff.net[0].proj.weight,
                                                                  ff.net[0].proj.bias, ff.net[2].weight,
                                                                  ff.net[2].bias))
                layers.append(block.ff.layer)
            else:
                block.proj_out = ChipmunkSingleProjOut(block.proj_out, block.proj_mlp, index, clock, config.mlp)
                block.proj_mlp, block.act_mlp = PassThrough(), PassThrough()
                layers.append(block.proj_out.layer)
                if isinstance(block.attn.processor, ChipmunkAttnProcessor):  # same input: starts beside the attention
                    block.attn.processor.layer.mlp_beside = block.proj_out.layer
                    if MLP_AHEAD:  # the whole MLP step, there: its input need not travel through the concat
                        block.proj_out.layer.runs_ahead = True
                        block.proj_mlp = NoColumns()
    transformer.chipmunk_layers, transformer.chipmunk_config = layers, config
    sparse_attn = sum(isinstance(layer, SparseAttentionLayer) for layer in layers)
    sparse_mlp = len(layers) - sparse_attn
    reorder = "off"
    if config.patchify.is_enabled:
        hooks = TokenReorder(config.patchify)
        transformer.register_forward_pre_hook(hooks.pre_hook, with_kwargs=True)
        transformer.register_forward_hook(hooks.post_hook, with_kwargs=True)
        transformer.chipmunk_reorder = hooks
        reorder = f"{config.patchify.chunk_size_1}x{config.patchify.chunk_size_1}/" \
                  f"{config.patchify.chunk_size_2}x{config.patchify.chunk_size_2} patches"
    a, m = config.attn, config.mlp
    return (f"applied: attention top {a.top_keys:.3g} keys per {a.mbm}-query group on {sparse_attn} layers "
            f"(dense every {a.full_step_every}); MLP top {m.top_keys:.3g}+{m.random_keys:.3g} random neurons per "
            f"{m.bm}-token block on {sparse_mlp} layers (dense every {m.full_step_every}); token reorder {reorder}; "
            f"kernels: {backend_status(transformer.device)}")


def chipmunk_stats(pipeline) -> dict[str, dict[str, int]]:
    """Dense/sparse/reselect counts per sparse layer (for tests and reports)."""
    out = {}
    for ref in _LAYERS.values():
        layer = ref()
        if layer is not None and layer.state.clock.scheduler is pipeline.scheduler:
            out[layer.state.name] = dict(layer.state.stats)
    return out

"""Chipmunk's math in plain PyTorch: the reference that defines what the Triton kernels (kernels.py) must compute,
and the path the layers take on CPU. Every function is pure (or writes only the caches it is handed); docs/ALGORITHMS.md
gives the formulas.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


# --- token reorder ---------------------------------------------------------------------------------

def patch_order(h: int, w: int, chunk_size_1: int, chunk_size_2: int) -> torch.Tensor:
    """perm with `reordered = raster[perm]`: row-major over 8x8 patches, within each over 4x4
    sub-patches, within each row-major. Consecutive tokens are then spatially local."""
    c1, c2 = chunk_size_1, chunk_size_2
    grid = torch.arange(h * w).view(h // c1, c1, w // c1, c1).permute(0, 2, 1, 3)  # (nh, nw, c1, c1)
    grid = grid.reshape(h // c1, w // c1, c1 // c2, c2, c1 // c2, c2).permute(0, 1, 2, 4, 3, 5)
    return grid.reshape(-1)


# --- attention --------------------------------------------------------------------------------------

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


def top_ascending(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest entries along the last dim, ascending (memory order), int32."""
    return scores.topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)


def top_and_random(scores: torch.Tensor, top: int, total: int, seed: torch.Tensor | int,
                   reference: torch.Tensor | None = None) -> torch.Tensor:
    """The `top` largest entries along the last dim plus `total - top` others at random (the highest of a
    hashed_uniform noise draw), indices ascending, int32: Chipmunk's neuron set with its random keys. With
    `reference` (float32), of |scores - reference| (scores widened to float32 first)."""
    if reference is not None:
        scores = (scores.float() - reference).abs()
    index = top_ascending(scores, top)
    if total == top:
        return index
    # The top set scores 2 > any noise in [0, 1), so one more selection takes it and the random keys.
    noise = hashed_uniform(scores.shape, seed, scores.device)
    return top_ascending(noise.scatter_(-1, index.long(), 2.0), total)


# --- MLP -------------------------------------------------------------------------------------------

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


FLOAT8, FLOAT8_MAX = torch.float8_e4m3fn, 448.0


def float8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): t in float8 e4m3 with one float32 scale per row (over its last dim), t ~ q * scale[..., None];
    scale = the row's absolute max / 448, as torchao's per-row float8 (the dense stack's linears) scales. A row of
    zeros gets scale 1. q keeps t's strides."""
    t32 = t.float()
    amax = t32.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FLOAT8_MAX, torch.ones_like(amax))
    return (t32 / scale[..., None]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_rows' inverse, in float32."""
    return q.float() * scale[..., None]


def sparse_mlp_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                         neuron_index: torch.Tensor, act_cache: torch.Tensor, out_cache: torch.Tensor,
                         block: int, float8_deltas: bool = False) -> torch.Tensor:
    """One sparse MLP step, in place on the caches; returns the fc1 pre-activations of the selected
    neurons, (B, nb, block, K) float32, for the caller's bookkeeping.

    For each token block b with neuron set S_b:
        act_S = gelu(x_b W1[S_b]^T + b1[S_b]);  out_cache_b += (act_S - act_cache_b[:, S_b]) W2[:, S_b]^T;
        act_cache_b[:, S_b] = act_S.
    x: (B, L, d); w1: (hidden, d); b1: (hidden,); w2: (out, hidden) (nn.Linear layouts);
    neuron_index: (B, nb, K); act_cache: (B, L, hidden); out_cache: (B, L, out) float32.
    `float8_deltas`: each token's deltas rounded to float8 with their scale (float8_rows) before fc2, as a float8
    fc2 multiplies them (w2 then holds the float8 weights' values).
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
    if float8_deltas:
        delta = dequantize_rows(*float8_rows(delta.to(act_cache.dtype)))
    w2s = w2.float().t()[idx]  # B, nb, K, out
    out_cache += (delta @ w2s).flatten(1, 2)[:, :L]
    cache_blocks.scatter_(3, gather_idx, act)
    act_cache.copy_(cache_blocks.flatten(1, 2)[:, :L])
    return pre


# --- random neurons: a counter-based hash -----------------------------------------------------------

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

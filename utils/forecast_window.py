"""The forecasts of a whole window of cached steps in one pass over the cache.

A forecast step of fora/taylor/hicache adds to the image stream `sum_s gate_s(temb) * sum_k w_k F_k[s]` over every
cached slot s (utils/caching.forecast_image_stream; F_k the cached full steps' features, w_k the forecast's weights
of them): it reads every cached tensor of every slot, 5.7 GB for FLUX.1-dev at 1024x1024 with three, and is bound by
that read (2.8 ms on an H100). Between two full steps the cache does not change; only the gates (through temb, the
timestep's embedding) and the weights w_k (through the distance) do, and both are known ahead: the schedule's
timesteps are. So the first forecast step of a window computes
the contributions of all of the window's steps (distances 1..W) in one pass over the cache, W accumulators per
element, and each later forecast step adds its own to the image stream. The contribution does not depend on the
image stream, which is the only input the forecast steps in between change.

window_contributions_reference is the definition; window_contributions runs a Triton kernel on CUDA (or under
TRITON_INTERPRET=1 on CPU tensors) and the reference elsewhere.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
try:
    import triton
    import triton.language as tl

    TRITON_IMPORTED = True
except Exception:  # noqa: BLE001 - any import failure means: use the reference
    TRITON_IMPORTED = False


def window_contributions_reference(orders: list[torch.Tensor], coefficients: torch.Tensor,
                                   gates: torch.Tensor) -> torch.Tensor:
    """out[j] = sum_s gates[j, :, s] * sum_k coefficients[j, k] D_k[s], in (at least) float32.

    orders: K tensors [S, B, N, D] (the cache's features, slots stacked); coefficients: [W, K], row j the forecast's
    weights at distance j + 1; gates: [W, B, S, D], every slot's gate at the window's steps. Returns [W, B, N, D]."""
    accumulate = accumulation_dtype(orders[0].dtype)
    rows = []
    for j in range(coefficients.shape[0]):
        predicted = sum(coefficients[j, k].to(accumulate) * order.to(accumulate) for k, order in enumerate(orders))
        rows.append((gates[j].to(accumulate).transpose(0, 1).unsqueeze(2) * predicted).sum(0))
    return torch.stack(rows)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


if TRITON_IMPORTED:
    @triton.jit
    def _window_kernel(D0, D1, D2, C, G, OUT, S, M, ND, D, W,
                       NUM_ORDERS: tl.constexpr, W_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """One program per BLOCK elements of the [B, N, D] image stream: a loop over the slots, each cached order's
        element read once, W_PAD accumulators (one per window step) in registers."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < M
        b, d = offs // ND, offs % D
        j = tl.arange(0, W_PAD)
        steps = j < W
        c0 = tl.load(C + j * NUM_ORDERS, mask=steps, other=0.0)
        if NUM_ORDERS > 1:
            c1 = tl.load(C + j * NUM_ORDERS + 1, mask=steps, other=0.0)
        if NUM_ORDERS > 2:
            c2 = tl.load(C + j * NUM_ORDERS + 2, mask=steps, other=0.0)
        gate_at = G + j[:, None] * (M // ND) * S * D + (b * S * D + d)[None, :]
        both = steps[:, None] & valid[None, :]
        acc = tl.zeros((W_PAD, BLOCK), dtype=tl.float32)
        p0, p1, p2 = D0 + offs, D1 + offs, D2 + offs  # pointers move on by one slot (M elements) a turn
        for _ in range(S):
            predicted = c0[:, None] * tl.load(p0, mask=valid, other=0.0).to(tl.float32)[None, :]
            if NUM_ORDERS > 1:
                predicted += c1[:, None] * tl.load(p1, mask=valid, other=0.0).to(tl.float32)[None, :]
            if NUM_ORDERS > 2:
                predicted += c2[:, None] * tl.load(p2, mask=valid, other=0.0).to(tl.float32)[None, :]
            acc += tl.load(gate_at, mask=both, other=0.0).to(tl.float32) * predicted
            p0, p1, p2, gate_at = p0 + M, p1 + M, p2 + M, gate_at + D
        tl.store(OUT + j[:, None] * M + offs[None, :], acc, mask=both)


def kernel_runs_on(device: torch.device) -> bool:
    return TRITON_IMPORTED and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


def window_contributions(orders: list[torch.Tensor], coefficients: torch.Tensor, gates: torch.Tensor,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """window_contributions_reference's result, into `out` ([W, B, N, D], accumulation_dtype) when given (a
    persistent buffer)."""
    num_steps, num_orders = coefficients.shape
    if not kernel_runs_on(orders[0].device) or num_orders > 3 or accumulation_dtype(orders[0].dtype) != torch.float32:
        result = window_contributions_reference(orders, coefficients, gates)
        return result if out is None else out.copy_(result)
    slots, batch, tokens, dim = orders[0].shape
    if any(not o.is_contiguous() for o in orders) or not gates.is_contiguous():
        raise ValueError("the window kernel reads contiguous orders [S, B, N, D] and gates [W, B, S, D]")
    out = torch.empty((num_steps, batch, tokens, dim), dtype=torch.float32, device=orders[0].device) \
        if out is None else out
    elements = batch * tokens * dim
    block = 64 if INTERPRET else 256
    padded = [*orders, *orders[:1] * (3 - num_orders)]  # unused pointers: the constexpr order count skips them
    _window_kernel[(triton.cdiv(elements, block),)](
        *padded, coefficients.contiguous(), gates, out, slots, elements, tokens * dim, dim, num_steps,
        NUM_ORDERS=num_orders, W_PAD=triton.next_power_of_2(num_steps), BLOCK=block,
        num_warps=1 if INTERPRET else 4)
    return out

"""Chipmunk on a Hopper GPU (H100, H200): kernel correctness, kernel speed, the interval=1 check and end to end.

Parts (--parts, comma-separated, run in this order; default all):
  kernels    Triton vs the PyTorch reference on fresh random bf16 inputs at FLUX shapes (4608 tokens,
             24 heads, head dim 128; MLP 3072 -> 12288 on 4608 tokens): softmax column sums, sparse
             attention (+ o_cache), sparse MLP (act cache, out cache, pre-activation means). Relative error
             must be within bf16 tolerance (2e-2); NaN fails.
  speed      do_bench medians: sparse attention at 16.5% keys vs cuDNN SDPA dense (target >= 3x), sparse
             MLP at 30% neurons vs the dense bf16 MLP (target >= 2x), and speed against sparsity; with the
             Triton kernels, the sparse MLP's pointer kernels (sparse_mlp(tma=False)) and its TMA kernels (tma=True,
             the layers' path on Hopper) side by side at each neuron set, and mlp.is_fp8's float8 sparse step
             beside them; every selection search, checked to give the same indices.
  interval1  `run_benchmark.py --check interval1` on random:flux-dev, 1280x768, --interval1_steps steps.
  profile    per-kernel device time of the sparse attention and sparse MLP calls at the target sparsities.
  graphs     Chipmunk's step graphs (one CUDA graph per step kind) against the same stack run eagerly: latents
             and per-layer decisions, 12 steps at the e2e shapes, three generations (capture, replay).
  e2e        run_benchmark.py on random:flux-dev, 1280x768, 50 steps, in this order: dense stack, Chipmunk
             (published config) with its step graphs, Chipmunk + HiCache (interval 5, order 2, fe 3, scale 0.6),
             Chipmunk without graphs (last: the first to be cut by the budget), all with regional torch.compile,
             no float8 and no inductor tuning flags (the same stack but for the layer under test; the flags' coordinate-descent tuning would double four cold compiles
             for ~2%); CUDA graphs wherever the variant can hold them (not under feature caching).
  trace      the dense stack and Chipmunk (without and with its step graphs) as in e2e, 12 steps under
             torch.profiler: host vs device ms and kernel launches per denoising step
             (scripts/trace_summary.py); traces in <out>/traces/.
Parts that would not fit in --budget_s are skipped and say so. Records: <out>/chipmunk_<gpu>.{json,md}.

    python scripts/bench_chipmunk.py --out runs/chipmunk                # all parts, ~7-8 min on an H100
    python scripts/bench_chipmunk.py --out runs/chipmunk --parts kernels,speed
    TRITON_INTERPRET=1 python scripts/bench_chipmunk.py --dry-run --out /tmp/chipmunk_dry   # CPU, small shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.chipmunk import chipmunk_stats  # noqa: E402
from utils.chipmunk import config as CF  # noqa: E402
from utils.chipmunk import kernels as T  # noqa: E402
from utils.chipmunk import layers as LY  # noqa: E402
from utils.chipmunk import reference as C  # noqa: E402
from utils.benchmark_utils import command_line, environment_record  # noqa: E402

import trace_summary  # noqa: E402  (scripts/, this script's folder)

BF16_TOLERANCE = 2e-2
FLUX = dict(tokens=4608, heads=24, head_dim=128, group=192, dim=3072, hidden=12288, block=128)
SMALL = dict(tokens=320, heads=2, head_dim=32, group=48, dim=64, hidden=256, block=64)  # --dry-run (48: a group of 3 x 16-row tiles, as 192 = 3 x 64)


def gpu_tag() -> str:
    """'h100', 'h200', ... from the device name, for record file names."""
    words = torch.cuda.get_device_name().lower().replace("-", " ").split()
    return next((w for w in words if w[:1] in "abhlv" and w[1:].isdigit()), "gpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref.double()).norm() / ref.double().norm())


def passed(err: float) -> bool:
    return err == err and err <= BF16_TOLERANCE  # NaN fails


def bench_ms(fn, dry: bool) -> float:
    if dry:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def attention_inputs(s: dict, device: str, dtype: torch.dtype):
    shape = (1, s["tokens"], s["heads"], s["head_dim"])
    return tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(4))


def mlp_inputs(s: dict, device: str, dtype: torch.dtype, count: int):
    d, hidden, tokens, block = s["dim"], s["hidden"], s["tokens"], s["block"]
    x = torch.randn(1, tokens, d, device=device, dtype=dtype)
    w1 = (torch.randn(hidden, d, device=device) / d ** 0.5).to(dtype)
    b1 = (0.1 * torch.randn(hidden, device=device)).to(dtype)
    w2 = (torch.randn(d, hidden, device=device) / hidden ** 0.5).to(dtype)
    b2 = (0.1 * torch.randn(d, device=device)).to(dtype)
    blocks = -(-tokens // block)
    index = torch.rand(1, blocks, hidden, device=device).topk(count, dim=-1).indices.sort(dim=-1).values.int()
    # Stored as SparseMlpLayer stores it for the Triton kernels.
    act = C.neuron_major(F.gelu(torch.randn(1, tokens, hidden, device=device), approximate="tanh").to(dtype))
    out_cache = torch.randn(1, tokens, d, device=device, dtype=torch.float32)
    return x, w1, b1, w2, b2, index, act, out_cache


# --- part 1: kernel correctness ----------------------------------------------------------------------

def part_kernels(s: dict, device: str, dtype: torch.dtype, use_triton: bool) -> dict:
    torch.manual_seed(0)
    rows = []
    q, k, v, o_cache = attention_inputs(s, device, dtype)
    ref_sums = C.attention_column_sums(q, k, s["group"])
    keys = CF.rounded_count(0.165, s["tokens"], 16 if s is SMALL else 128)
    ref_index = C.top_ascending(ref_sums, keys)
    ref_attn = C.sparse_attention_reference(q, k, v, ref_index, s["group"], o_cache)
    if not use_triton:
        return {"skipped": f"Triton kernels unavailable ({T.UNAVAILABLE_REASON})", "rows": []}
    sums = T.attention_column_sums(q, k, s["group"])
    rows.append({"check": "softmax column sums per query group", "rel_err": rel_err(sums, ref_sums)})
    fa3_lse = fa3_log_sum_exp(q, k, v)
    if fa3_lse is not None:  # Chipmunk's dense steps take the rows' log-sum-exp from FA3 when it gives one
        rows.append({"check": "softmax column sums from FA3's log-sum-exp",
                     "rel_err": rel_err(T.attention_column_sums(q, k, s["group"], fa3_lse), ref_sums)})
    index = C.top_ascending(sums, keys)
    overlap = float((index[..., :, None] == ref_index[..., None, :]).any(-1).float().mean())
    rows.append({"check": "selected key sets, overlap with reference (info)", "rel_err": None, "value": overlap})
    rows.append({"check": f"sparse attention + o_cache ({keys}/{s['tokens']} keys)",
                 "rel_err": rel_err(T.sparse_attention(q, k, v, ref_index, s["group"], o_cache), ref_attn)})
    plain_ref = C.sparse_attention_reference(q, k, v, ref_index, s["group"])
    rows.append({"check": "sparse attention, no cache",
                 "rel_err": rel_err(T.sparse_attention(q, k, v, ref_index, s["group"]), plain_ref)})
    # A dense step's new o_cache = O_dense - A_S in one pass (here o_cache stands in for O_dense).
    rows.append({"check": "dense step: O_dense - sparse attention in one pass",
                 "rel_err": rel_err(T.sparse_attention(q, k, v, ref_index, s["group"], dense_out=o_cache),
                                    C.sparse_attention_reference(q, k, v, ref_index, s["group"], dense_out=o_cache))})
    if keys % 128:  # the kernel drops its masks when the key count is a multiple of 128: check that path too
        full_tiles = C.top_ascending(ref_sums, 128)
        rows.append({"check": "sparse attention + o_cache (128 keys: unmasked tiles)",
                     "rel_err": rel_err(T.sparse_attention(q, k, v, full_tiles, s["group"], o_cache),
                                        C.sparse_attention_reference(q, k, v, full_tiles, s["group"], o_cache))})
    del q, k, v, o_cache, ref_sums, sums

    count = CF.rounded_count(0.35, s["hidden"], 16 if s is SMALL else 256)
    x, w1, b1, w2, b2, index, act, out_cache = mlp_inputs(s, device, dtype, count)
    act_ref, out_ref, act_before, out_before = act.clone(), out_cache.clone(), act.clone(), out_cache.clone()
    pre = C.sparse_mlp_reference(x, w1, b1, w2, index, act_ref, out_ref, s["block"])
    layer_out = torch.empty(out_cache.shape, dtype=x.dtype, device=x.device)
    means = T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, act, out_cache, s["block"], out=layer_out)
    # The layers' call: the delta kernel writes the means into the reference pre-activations (was a scatter).
    pre_mean = torch.randn(*means.shape[:2], s["hidden"], device=device)
    scattered = pre_mean.clone().scatter_(2, index.long(), means)
    T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, act_before, out_before, s["block"], pre_mean=pre_mean)
    rows.append({"check": "sparse MLP: means written by the delta kernel vs scattered: mismatch", "exact": True,
                 "rel_err": float((pre_mean != scattered).float().mean())})
    del pre_mean, scattered, act_before, out_before
    ref_means = LY.selected_block_means(pre, s["tokens"])
    rows.append({"check": f"sparse MLP: activation cache ({count}/{s['hidden']} neurons)",
                 "rel_err": rel_err(act, act_ref)})
    rows.append({"check": "sparse MLP: output cache", "rel_err": rel_err(out_cache, out_ref)})
    rows.append({"check": "sparse MLP: layer output from fc2's epilogue",
                 "rel_err": rel_err(layer_out, out_ref.to(layer_out.dtype))})
    rows.append({"check": "sparse MLP: fc1 pre-activation block means", "rel_err": rel_err(means, ref_means)})
    # mlp.is_fp8: the kernels on float8 operands (x per token, W1's and W2's rows, the deltas per token) against the
    # reference of their values in float32, from the same caches.
    (xq, xs), (w1q, w1s), (w2q, w2s) = T.float8_rows(x), C.float8_rows(w1), C.float8_rows(w2)
    act8, out8, act8_ref, out8_ref = act.clone(), out_cache.clone(), act.clone(), out_cache.clone()
    T.sparse_mlp(xq, w1q, b1, w2q.t().contiguous(), index, act8, out8, s["block"], x_scale=xs, w1_scale=w1s,
                 w2_scale=w2s)
    C.sparse_mlp_reference(C.dequantize_rows(xq, xs), C.dequantize_rows(w1q, w1s), b1, C.dequantize_rows(w2q, w2s),
                           index, act8_ref, out8_ref, s["block"], float8_deltas=True)
    rows.append({"check": "float8 sparse MLP: activation cache", "rel_err": rel_err(act8, act8_ref)})
    rows.append({"check": "float8 sparse MLP: output cache update",
                 "rel_err": rel_err(out8 - out_cache, out8_ref - out_cache)})
    rows.append({"check": "float8 x: compiled quantization's values unlike the reference's (info)", "rel_err": None,
                 "value": float((xq.float() != C.float8_rows(x)[0].float()).float().mean())})
    del x, w1, b1, w2, b2, index, act, out_cache, act_ref, out_ref, pre, layer_out, act8, out8, act8_ref, out8_ref

    # A dense MLP step's epilogue over W1 x^T (bias, GELU into the neuron-major cache, block means) against torch.
    pre_t = torch.randn(1, s["hidden"], s["tokens"], device=device, dtype=dtype)
    bias = torch.randn(s["hidden"], device=device, dtype=dtype)
    act_t = torch.empty_like(pre_t)
    means = T.dense_mlp_epilogue(pre_t, bias, act_t, s["block"])
    biased = (pre_t.float() + bias.float()[:, None]).transpose(1, 2)
    rows.append({"check": "dense MLP step epilogue: GELU into the neuron-major cache",
                 "rel_err": rel_err(act_t.transpose(1, 2), C.gelu_tanh(biased))})
    rows.append({"check": "dense MLP step epilogue: block means", "rel_err": rel_err(means, C.block_means(biased,
                                                                                                     s["block"]))})
    del pre_t, act_t, biased

    # Selection, as a reselection step calls it ((blocks, hidden) float32 changes): the top set against torch.topk
    # (random floats: no ties), and the one-launch neuron set + random keys against the two launches it replaced,
    # for an int seed and a seed in a device tensor (CUDA-graph replays). Indices: these must match exactly.
    blocks = -(-s["tokens"] // s["block"])
    change = torch.randn(blocks, s["hidden"], device=device)
    top = int(round(0.3 * s["hidden"]))
    exact = change.topk(top, -1).indices.sort(-1).values.int()
    rows.append({"check": f"top set ({top}/{s['hidden']} neurons) vs torch.topk: index mismatch", "exact": True,
                 "rel_err": float((T.top_ascending(change, top) != exact).float().mean())})
    seed = 1_000_007
    noise = C.hashed_uniform(change.shape, seed, device)
    composed = T.top_ascending(noise.scatter_(-1, T.top_ascending(change, top).long(), 2.0), count)
    for given, label in ((seed, "int seed"), (torch.tensor(seed, device=device), "seed in a device tensor")):
        got = T.top_and_random(change, top, count, given)
        rows.append({"check": f"top + random keys in one launch ({label}) vs two launches: index mismatch",
                     "exact": True, "rel_err": float((got != composed).float().mean())})
    # The layers' call: bf16 means ranked by their change from a float32 reference inside the kernel.
    now, reference = torch.randn(blocks, s["hidden"], device=device, dtype=dtype), torch.randn_like(change)
    got = T.top_and_random(now, top, count, seed, reference=reference)
    expected = T.top_and_random((now.float() - reference).abs(), top, count, seed)
    rows.append({"check": "top + random keys of |now - reference| in the kernel vs computed before: index mismatch",
                 "exact": True, "rel_err": float((got != expected).float().mean())})
    for r in rows:
        r["passed"] = None if r["rel_err"] is None else (r["rel_err"] == 0 if r.get("exact") else passed(r["rel_err"]))
    return {"rows": rows, "passed": all(r["passed"] for r in rows if r["passed"] is not None)}


def fa3_log_sum_exp(q, k, v):
    """FA3's per-row log-sum-exp at these inputs, or None (no GPU, no FA3, or a build that does not return it)."""
    from utils.attention import fa3_attention_with_lse, fa3_unavailable_reason

    return fa3_attention_with_lse(q, k, v)[1] if q.is_cuda and fa3_unavailable_reason() is None else None


# --- part 2: kernel speed ----------------------------------------------------------------------------

def dense_attention_fn(q, k, v, dry: bool):
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # cuDNN's preferred layout
    if dry:
        return lambda: F.scaled_dot_product_attention(qt, kt, vt)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt)
    return run


def part_speed(s: dict, device: str, dtype: torch.dtype, use_triton: bool, dry: bool) -> dict:
    torch.manual_seed(1)
    sparse_attention = T.sparse_attention if use_triton else C.sparse_attention_reference
    sparse_mlp = T.sparse_mlp if use_triton else None
    multiple_k, multiple_n = (16, 16) if s is SMALL else (128, 128)
    q, k, v, o_cache = attention_inputs(s, device, dtype)
    dense_ms = bench_ms(dense_attention_fn(q, k, v, dry), dry)
    sums = C.attention_column_sums(q, k, s["group"])
    attn_rows = []
    for fraction in (0.05, 0.1, 0.165, 0.25, 0.5, 1.0):
        keys = CF.rounded_count(fraction, s["tokens"], multiple_k)
        index = C.top_ascending(sums, keys)
        ms = bench_ms(lambda: sparse_attention(q, k, v, index, s["group"], o_cache), dry)
        attn_rows.append({"top_keys": fraction, "keys": keys, "ms": ms, "speedup_vs_dense": dense_ms / ms})
    colsum_ms = bench_ms(lambda: (T.attention_column_sums if use_triton else C.attention_column_sums)(q, k, s["group"]),
                         dry)
    fa3_lse = fa3_log_sum_exp(q, k, v) if use_triton else None
    colsum_lse_ms = bench_ms(lambda: T.attention_column_sums(q, k, s["group"], fa3_lse), dry) if fa3_lse is not None \
        else None
    del q, k, v, o_cache, sums

    mlp_rows, dense_mlp_ms = [], None
    x, w1, b1, w2, b2, _, act, out_cache = mlp_inputs(s, device, dtype, 16)
    dense_mlp_ms = bench_ms(lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2), dry)
    w2_t = w2.t().contiguous()
    layer_out = torch.empty(out_cache.shape, dtype=x.dtype, device=x.device)  # the layer's output, as the layer asks
    blocks = -(-s["tokens"] // s["block"])
    # Each token block gathers its own neuron rows of W1 and W2^T, so the weight traffic depends on how much the
    # blocks' sets overlap (L2 serves the shared rows). Independent random sets per block are the worst case and
    # the one the target is judged on; one set shared by every block is the best case (real FLUX sets lie between).
    # With the Triton kernels, the "ms" column is the pointer kernels (tma=False) and sparse_mlp(tma=True) (X and the
    # deltas through TMA, the layers' path on Hopper) is timed beside them at each set; a TMA failure is recorded and
    # ends its timings, not the part.
    tma_error, float8_error = None, None
    float8 = None
    if sparse_mlp is not None:  # mlp.is_fp8's weights: W1's float8 rows, W2's as W2^T rows (the layer's _float8)
        (w1q, w1s), (w2q, w2s) = C.float8_rows(w1), C.float8_rows(w2)
        float8 = (w1q, w1s, w2q.t().contiguous(), w2s)
    for sets in ("independent", "shared"):
        for fraction in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0):
            count = CF.rounded_count(fraction, s["hidden"], multiple_n)
            picks = torch.rand(1, blocks if sets == "independent" else 1, s["hidden"], device=device)
            index = picks.topk(count, -1).indices.sort(-1).values.int().expand(1, blocks, count).contiguous()
            if sparse_mlp is None:
                fn = lambda: C.sparse_mlp_reference(x, w1, b1, w2, index, act, out_cache, s["block"])  # noqa: E731
            else:
                fn = lambda: sparse_mlp(x, w1, b1, w2_t, index, act, out_cache, s["block"], out=layer_out,  # noqa: E731
                                        tma=False)
            ms = bench_ms(fn, dry)
            mlp_rows.append({"neuron_sets": sets, "top_keys": fraction, "neurons": count, "ms": ms,
                             "speedup_vs_dense": dense_mlp_ms / ms})
            if sparse_mlp is not None and tma_error is None:
                try:
                    mlp_rows[-1].update(tma_timing(s, x, w1, b1, w2_t, index, act, out_cache, layer_out, ms, dry))
                except Exception as e:  # noqa: BLE001 - recorded; the part goes on with the pointer kernels' rows
                    tma_error = f"{type(e).__name__}: {str(e).strip()[-1000:]}"
                    print(f"[speed] sparse_mlp(tma=True) failed, no more of their timings: "
                          f"{tma_error}", flush=True)
            if float8 is not None and float8_error is None:
                try:
                    mlp_rows[-1].update(float8_timing(s, x, w1, b1, w2_t, index, act, out_cache, layer_out, float8,
                                                      ms, dry))
                except Exception as e:  # noqa: BLE001 - recorded, as the TMA kernels' failure
                    float8_error = f"{type(e).__name__}: {str(e).strip()[-1000:]}"
                    print(f"[speed] float8 sparse_mlp failed, no more of its timings: {float8_error}", flush=True)
    attn_target = next(r for r in attn_rows if r["top_keys"] == 0.165)
    mlp_target = next(r for r in mlp_rows if r["top_keys"] == 0.3 and r["neuron_sets"] == "independent")
    selection = part_speed_selection(s, device, blocks, multiple_n, dry) if use_triton else []
    return {
        "autotuned": autotune_picks() if use_triton else {},
        "dense_attention_ms": dense_ms, "dense_attention": "cuDNN SDPA" if not dry else "SDPA (CPU)",
        "column_sums_ms (dense steps only)": colsum_ms, "column_sums_with_fa3_lse_ms": colsum_lse_ms,
        "attention": attn_rows,
        "dense_mlp_ms": dense_mlp_ms, "mlp": mlp_rows, "mlp_tma_error": tma_error, "mlp_float8_error": float8_error,
        "selection": selection,
        "targets": {"attention_16.5%_>=3x": attn_target["speedup_vs_dense"] >= 3.0,
                    "mlp_30%_>=2x": mlp_target["speedup_vs_dense"] >= 2.0},
    }


def caches_after(s: dict, x, w1, b1, w2_t, index, act, out_cache, layer_out, **variant) -> tuple:
    """The activation and output caches after one sparse_mlp call of this variant, from copies of the given ones."""
    a, o = act.clone(), out_cache.clone()
    T.sparse_mlp(x, w1, b1, w2_t, index, a, o, s["block"], out=layer_out, **variant)
    return a, o


def tma_timing(s: dict, x, w1, b1, w2_t, index, act, out_cache, layer_out, pointer_ms: float, dry: bool) -> dict:
    """sparse_mlp(tma=True) at one neuron set: its median ms, its speedup over the pointer kernels' (pointer_ms), and
    the relative error of its output cache against theirs from the same caches (the two sum the same tiles)."""
    pointer, tma = (caches_after(s, x, w1, b1, w2_t, index, act, out_cache, layer_out, tma=t) for t in (False, True))
    err = rel_err(tma[1], pointer[1])
    ms = bench_ms(lambda: T.sparse_mlp(x, w1, b1, w2_t, index, act, out_cache, s["block"], out=layer_out, tma=True),
                  dry)
    return {"tma_ms": ms, "tma_speedup_vs_pointer": pointer_ms / ms, "tma_rel_err_vs_pointer": err}


def float8_timing(s: dict, x, w1, b1, w2_t, index, act, out_cache, layer_out, float8: tuple, bf16_ms: float,
                  dry: bool) -> dict:
    """mlp.is_fp8's sparse step at one neuron set, as the layer runs it (x quantized per token, then sparse_mlp with
    W1's and W2's float8 rows; the TMA fc1 where it runs): its median ms, its speedup over the bf16 pointer kernels'
    (bf16_ms), and the relative error of its output-cache update against theirs from the same caches."""
    w1q, w1s, w2tq, w2s = float8

    def step(a, o):
        xq, xs = T.float8_rows(x)
        T.sparse_mlp(xq, w1q, b1, w2tq, index, a, o, s["block"], out=layer_out, x_scale=xs, w1_scale=w1s,
                     w2_scale=w2s)

    # From a fresh activation cache: the timing loops before left the selected neurons' current activations in
    # `act`, so their change, fc2's input, would be 0.
    start = torch.randn_like(act)
    a, o = start.clone(), out_cache.clone()
    step(a, o)
    bf16 = caches_after(s, x, w1, b1, w2_t, index, start, out_cache, layer_out, tma=False)
    err = rel_err(o - out_cache, bf16[1] - out_cache)
    ms = bench_ms(lambda: step(act, out_cache), dry)
    return {"float8_ms": ms, "float8_speedup_vs_bf16": bf16_ms / ms, "float8_update_rel_err_vs_bf16": err}


def autotune_picks() -> dict[str, dict[str, str]]:
    """Each autotuned Chipmunk kernel's chosen config per tuning key (the shapes the speed part ran)."""
    import triton

    picks = {}
    for name in dir(T):
        kernel = getattr(T, name)
        if isinstance(kernel, triton.runtime.Autotuner) and kernel.cache:
            picks[name] = {", ".join(map(str, key)): ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
                           + f", warps {config.num_warps}, stages {config.num_stages}"
                           for key, config in kernel.cache.items()}
    return picks


def part_speed_selection(s: dict, device: str, blocks: int, multiple_n: int, dry: bool) -> list[dict]:
    """The selection kernels as a reselection step launches them (neuron sets: one row per token block; key sets: one
    row per head and query group), with each search for the K-th largest key and with the autotuner's pick (which
    one it is: the record's "autotuned" picks)."""
    neurons = torch.randn(blocks, s["hidden"], device=device)
    top, total = CF.rounded_count(0.3, s["hidden"], 1), CF.rounded_count(0.35, s["hidden"], multiple_n)
    keys = torch.randn(s["heads"] * -(-s["tokens"] // s["group"]), s["tokens"], device=device)
    key_count = CF.rounded_count(0.165, s["tokens"], 16 if s is SMALL else 128)
    calls = {"top_and_random (neuron sets + random keys)": lambda search: T.top_and_random(neurons, top, total, 7,
                                                                                           search=search),
             "top_ascending (attention key sets)": lambda search: T.top_ascending(keys, key_count, search=search)}
    searches = (*T.SELECTION_SEARCHES, None)
    # Every search must give the bitwise search's indices (the kernels part checks only the autotuner's pick).
    return [{"call": name, **{f"{search or 'autotuned'}_ms": bench_ms(lambda: call(search), dry) for search in searches},
             "same_indices_every_search": all(torch.equal(call(search), call("bitwise")) for search in searches)}
            for name, call in calls.items()]


# --- profile: per-kernel device time --------------------------------------------------------------------

def part_profile(s: dict, device: str, dtype: torch.dtype) -> dict:
    """Per-kernel CUDA time of the Triton sparse attention (16.5% keys) and sparse MLP (30% neurons) at FLUX shapes,
    from torch.profiler over 10 calls each after a warm-up: which kernel to work on."""
    torch.manual_seed(2)
    multiple = 16 if s is SMALL else 128
    q, k, v, o_cache = attention_inputs(s, device, dtype)
    sums = C.attention_column_sums(q, k, s["group"])
    index = C.top_ascending(sums, CF.rounded_count(0.165, s["tokens"], multiple))
    neurons_30 = CF.rounded_count(0.3, s["hidden"], multiple)
    x, w1, b1, w2, _, neurons, act, out_cache = mlp_inputs(s, device, dtype, neurons_30)
    w2_t = w2.t().contiguous()
    layer_out = torch.empty(out_cache.shape, dtype=x.dtype, device=x.device)  # the layer's output, as the layer asks
    calls = {"sparse attention": lambda: T.sparse_attention(q, k, v, index, s["group"], o_cache),
             "sparse MLP": lambda: T.sparse_mlp(x, w1, b1, w2_t, neurons, act, out_cache, s["block"], out=layer_out)}
    rows = []
    for name, fn in calls.items():
        fn()  # autotune outside the profile
        if device == "cuda":
            torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
        for e in prof.key_averages():
            device_us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
            if device_us and str(e.device_type).endswith("CUDA"):  # kernels, not the CPU ops that launch them
                rows.append({"call": name, "kernel": e.key, "calls": e.count, "ms_per_call": device_us / 1e3 / 10})
    return {"rows": rows}


# --- parts 3 and 4: subprocesses through run_benchmark.py ----------------------------------------------

def run_child(cmd: list[str], timeout: float) -> tuple[int, str]:
    """`cmd` in the repository root."""
    print("[bench_chipmunk] $", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout:.0f} s\n{(e.stdout or '')[-2000:] if isinstance(e.stdout, str) else ''}"
    tail = (proc.stdout + proc.stderr)[-4000:]
    print(tail[-1500:], flush=True)
    return proc.returncode, tail


def model_args(dry: bool) -> list[str]:
    if dry:
        return ["--ckpt", "tiny", "--disable_bf16"]
    return ["--ckpt", "random:flux-dev", "--height", "768", "--width", "1280"]


def part_interval1(out: Path, dry: bool, steps: int, timeout: float) -> dict:
    config = "configs/chipmunk-tiny.yml" if dry else "configs/chipmunk-flux.yml"
    cmd = [sys.executable, "run_benchmark.py", "--check", "interval1", *model_args(dry), "--num_inference_steps",
           str(steps), "--chipmunk_config", config, "--results_dir", str(out / "interval1")]
    rc, tail = run_child(cmd, timeout)
    records = sorted((out / "interval1").glob("interval1_*.json"))
    record = json.loads(records[-1].read_text()) if records and rc in (0, 1) else None
    return {"command": " ".join(cmd[1:]), "exit_code": rc, "passed": rc == 0,
            "rows": record["rows"] if record else None, "log_tail": None if record else tail}


def stack_args(results_dir: Path, dry: bool, steps: int, runs: int) -> list[str]:
    """run_benchmark.py flags of the dense stack that the Chipmunk variants add to. No inductor tuning flags: their
    coordinate-descent tuning doubles each cold compile (~2% of step time, measured on the dense stack), and all
    variants share the same stack but for Chipmunk."""
    args = [*model_args(dry), "--num_inference_steps", str(steps), "--num_runs", str(runs), "--warmup_runs", "1",
            "--disable_quant", "--results_dir", str(results_dir)]
    return args + (["--compile_export_mode", "disabled"] if dry else
                   ["--compile_export_mode", "compile", "--compile_scope", "regional", "--disable_inductor_tuning_flags"])


def part_trace(out: Path, dry: bool, steps: int, deadline: float) -> dict:
    """A profiled run of the dense stack and of Chipmunk, summarized per denoising step: host vs device ms and
    kernel launches (scripts/trace_summary.py), which says whether a step is bound by launches or by kernels."""
    config = "configs/chipmunk-tiny.yml" if dry else "configs/chipmunk-flux.yml"
    rows = []
    variants = {"dense stack": [], "chipmunk": ["--chipmunk_config", config]}
    if not dry:  # under the profiler a replayed graph's kernels are still listed: device time per step kind
        graphs = ["--chipmunk_config", config, "--compile_mode", "reduce-overhead"]
        variants["chipmunk step graphs"] = graphs
    for name, extra in variants.items():
        left = deadline - time.time()
        if left < 60 and not dry:
            rows.append({"variant": name, "skipped": f"budget: {left:.0f} s left"})
            continue
        trace = out / "traces" / f"{name.replace(',', '').replace(' ', '_')}_{steps}steps.json.gz"
        trace.parent.mkdir(parents=True, exist_ok=True)
        rc, tail = run_child([sys.executable, "run_benchmark.py", *stack_args(out / "traces", dry, steps, 1), *extra,
                              "--trace-file", str(trace)], left if not dry else 600)
        if rc != 0 or not trace.exists():
            rows.append({"variant": name, "exit_code": rc, "log_tail": tail})
            continue
        events = trace_summary.load_events(trace)
        # Steps 0-3 are one of each kind (both dense, attention dense + reselect, sparse, sparse + reselect).
        rows.append({"variant": name, "trace": str(trace), "steps": trace_summary.step_table(events),
                     "top_kernels": trace_summary.kernel_table(events, 12),
                     "step_kernels": trace_summary.step_kernel_tables(events, min(4, steps), 40)})
    return {"steps": steps, "rows": rows}


def cache_digests(layers: list) -> dict[str, tuple[float, float]]:
    """'layer/cache' -> (sum, sum of |x|) in float64 of each Chipmunk layer's caches now: two runs whose caches hold
    the same values give the same checksums, and a change in any element almost surely moves one of them."""
    names, sums = [], []
    for layer in layers:
        for cache in sorted(layer.CACHES):
            tensor = getattr(layer, cache)
            if tensor is None:
                continue
            values = tensor.double()
            names.append(f"{layer.name}/{cache}")
            sums.append(torch.stack([values.sum(), values.abs().sum()]))
    if not sums:
        return {}
    return dict(zip(names, map(tuple, torch.stack(sums).cpu().tolist())))


def first_departures(run: list[dict], reference: list[dict], limit: int = 8) -> list[dict]:
    """The first `limit` (step, cache) whose checksums differ between a run's per-step digests and the reference's,
    in step order and, within a step, in the layers' order (which is the order they compute in). A cache the
    reference did not have yet is left out: the buffers outlive a generation, so a later run's step 0 still shows
    the last generation's neuron sets, which that step does not use."""
    found = []
    for step, (digest, expected) in enumerate(zip(run, reference)):
        for name, sums in digest.items():
            if name in expected and expected[name] != sums:
                found.append({"step": step, "cache": name, "sums": sums, "expected": expected[name]})
                if len(found) == limit:
                    return found
    return found


def part_graphs(out: Path, dry: bool, steps: int) -> dict:
    """Chipmunk's step graphs (utils/step_graphs.py, utils/chipmunk/graphs.py) against the same compiled stack run eagerly, in one process
    on one pipeline: two eager generations (their difference is the run-to-run noise floor), then three with the
    graphs installed (the first runs each kind eagerly once and captures at its second occurrence, the second
    captures the kinds seen once, the third only replays). Same seed throughout; latents compared to the first."""
    if dry:
        return {"skipped": "CUDA graphs need a GPU"}
    from utils.benchmark_utils import create_parser, pipeline_call_kwargs, resolved_defaults
    from utils.step_graphs import install_step_graphs
    from utils.pipeline_utils import load_pipeline, optimize, validate_args

    args = validate_args(resolved_defaults(create_parser().parse_args(
        [*model_args(dry), "--num_inference_steps", str(steps), "--chipmunk_config", "configs/chipmunk-flux.yml",
         "--disable_quant", "--compile_export_mode", "compile", "--compile_scope", "regional",
         "--disable_inductor_tuning_flags"])))
    pipe = optimize(load_pipeline(args), args)

    from torch._dynamo.utils import counters

    digests = {}  # run -> per step: every layer cache's checksums, to find where a run first departs from eager 1

    def generate(name: str):
        """Latents, seconds, the layers' decision counts, and how many graphs dynamo compiled during the run (a
        recompile changes kernels, hence rounding: it tells a recompile from a wrong replay). Each step's cache
        checksums go to digests[name] (one sync per step, between steps: it changes no stream's order)."""
        compiled = counters["stats"]["unique_graphs"]
        steps_seen = digests[name] = []

        def at_step_end(_pipe, _i, _t, callback_kwargs):
            steps_seen.append(cache_digests(pipe.transformer.chipmunk_layers))
            return callback_kwargs

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        images = pipe(**pipeline_call_kwargs(args), generator=torch.manual_seed(0), output_type="latent",
                      callback_on_step_end=at_step_end).images
        torch.cuda.synchronize()
        return (images.float(), time.perf_counter() - t0, chipmunk_stats(pipe),
                counters["stats"]["unique_graphs"] - compiled)

    runs = {name: generate(name) for name in ("eager 1", "eager 2")}
    install_step_graphs(pipe.transformer)
    for i in (1, 2, 3):
        runs[f"graphs {i}"] = generate(f"graphs {i}")
    reference, _, stats_eager, _ = runs["eager 1"]
    rows = []
    previous = stats_eager
    for name, (latents, seconds, stats, compiled) in runs.items():
        per_generation = {layer: {k: n - previous[layer][k] for k, n in counts.items()} for layer, counts in
                          stats.items()} if name != "eager 1" else stats
        previous = stats
        rows.append({"run": name, "seconds": seconds, "rel_err_vs_eager_1": rel_err(latents, reference),
                     "bitwise_equal": bool(torch.equal(latents, reference)),
                     "same_layer_decisions": per_generation == stats_eager, "graphs_compiled": compiled,
                     "first_cache_departures": first_departures(digests[name], digests["eager 1"])})
    # Graphs must match eager as closely as eager matches itself (its second generation against its first).
    tolerance = max(1e-3, 10 * rows[1]["rel_err_vs_eager_1"])
    graphed = [r for r in rows if r["run"].startswith("graphs")]
    beside = [layer for layer in pipe.transformer.chipmunk_layers
              if isinstance(layer, LY.SparseAttention) and layer.mlp_beside is not None]
    return {"steps": steps, "rows": rows, "calls": dict(pipe.transformer.step_graphs.calls),
            "tolerance": tolerance, "mlps_beside_attention": len(beside),
            "passed": all(r["same_layer_decisions"] and r["rel_err_vs_eager_1"] <= tolerance for r in graphed)}


E2E_VARIANTS = ("dense", "chipmunk", "hicache", "eager")  # in the order they run
E2E_DEFAULT = "dense,chipmunk,hicache,eager"


def e2e_variant_keys(wanted: str) -> list[str]:
    keys = [k.strip() for k in wanted.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(E2E_VARIANTS))
    if unknown:
        raise ValueError(f"unknown e2e variant(s) {unknown}: choose from {', '.join(E2E_VARIANTS)}")
    return keys


def part_e2e(out: Path, dry: bool, steps: int, runs: int, deadline: float, float8: bool = False,
             wanted: str = E2E_DEFAULT) -> dict:
    """Every variant gets CUDA graphs where it can hold them: the dense stack's whole forward as one graph,
    Chipmunk's as one graph per step kind; feature caching's data-dependent steps cannot be replayed.
    The variants are bf16 (stack_args); `float8` adds, after the others, the dense stack and Chipmunk with float8
    linears (Chipmunk's dense projections only), and Chipmunk with its MLP in float8 too
    (configs/chipmunk-flux-fp8.yml). `wanted`: which of E2E_VARIANTS run."""
    keys = e2e_variant_keys(wanted)
    common = stack_args(out / "e2e", dry, steps, runs)
    config = "configs/chipmunk-tiny.yml" if dry else "configs/chipmunk-flux.yml"
    graphs = [] if dry else ["--compile_mode", "reduce-overhead"]
    with_graphs = " (dry run: no CUDA graphs)" if dry else " (CUDA graphs)"
    per_kind = with_graphs.replace("graphs", "graphs per step kind")
    variants = {  # name: (key, flags)
        "dense stack" + with_graphs: ("dense", graphs),
        "chipmunk" + per_kind: ("chipmunk", ["--chipmunk_config", config, *graphs]),
        "chipmunk + hicache (N=5, order 2, fe 3, scale 0.6)": ("hicache", [
            "--chipmunk_config", config, "--cache_mode", "hicache", "--interval", "5", "--max_order", "2",
            "--first_enhance", "3", "--hicache_scale", "0.6"]),
        "chipmunk, no CUDA graphs": ("eager", ["--chipmunk_config", config]),  # last: least informative if cut
    }
    variants = {name: flags for name, (key, flags) in variants.items() if key in keys}
    float8_mlp = "configs/chipmunk-tiny.yml" if dry else "configs/chipmunk-flux-fp8.yml"  # mlp.is_fp8 (tiny: off)
    with_float8 = {"dense stack + float8" + with_graphs: graphs,  # run without stack_args' --disable_quant
                   "chipmunk + float8 (dense projections)" + per_kind: ["--chipmunk_config", config, *graphs],
                   "chipmunk + float8, its MLP too" + per_kind: ["--chipmunk_config", float8_mlp, *graphs]} \
        if float8 else {}
    variants.update(with_float8)
    rows = []
    for name, extra in variants.items():
        left = deadline - time.time()
        if left < 60 and not dry:
            rows.append({"variant": name, "skipped": f"budget: {left:.0f} s left"})
            continue
        before = set((out / "e2e").glob("bench_*.json")) if (out / "e2e").exists() else set()
        flags = [a for a in common if a != "--disable_quant"] if name in with_float8 else common
        rc, tail = run_child([sys.executable, "run_benchmark.py", *flags, *extra], left if not dry else 600)
        new = sorted(set((out / "e2e").glob("bench_*.json")) - before) if (out / "e2e").exists() else []
        if rc == 124:  # run_child's timeout: the budget ran out during this variant, it did not fail
            rows.append({"variant": name, "skipped": f"budget: cut after {left:.0f} s", "log_tail": tail})
            continue
        if rc != 0 or not new:
            rows.append({"variant": name, "exit_code": rc, "log_tail": tail})
            continue
        record = json.loads(new[-1].read_text())
        # Mean step (denoising total / steps): with caching most steps are cheap forecasts, so a median step
        # would describe only those.
        rows.append({"variant": name, "median_s": record["latency_s"]["median"],
                     "step_ms": 1e3 * record["stages_s"]["denoising_total"]["median"] / steps,
                     "stack": record["stack"], "record": new[-1].name})
    # Each variant against the dense stack of its own precision (bf16, or float8 linears).
    dense = {precision: next((r.get("median_s") for r in rows if r["variant"].startswith("dense stack")
                              and (r["variant"] in with_float8) == precision), None) for precision in (False, True)}
    for r in rows:
        reference = dense[r["variant"] in with_float8]
        if reference and r.get("median_s"):
            r["speedup_vs_dense"] = reference / r["median_s"]
    return {"steps": steps, "runs": runs, "rows": rows}


# --- report -----------------------------------------------------------------------------------------

def markdown(record: dict) -> str:
    lines = [f"# Chipmunk on {record['environment'].get('gpu') or 'CPU (dry run)'}", "", f"`{record['command']}`", ""]
    k = record.get("kernels")
    if k:
        lines += [f"## Kernel correctness (Triton vs PyTorch reference, {'float32, interpreter' if record['dry_run'] else 'bf16'} inputs)", ""]
        if k.get("skipped"):
            lines.append(f"skipped: {k['skipped']}")
        else:
            lines += ["| check | rel. error | result |", "|---|---|---|"]
            for r in k["rows"]:
                if r["rel_err"] is None:
                    lines.append(f"| {r['check']} | {r['value']:.4f} | info |")
                else:
                    lines.append(f"| {r['check']} | {r['rel_err']:.2e} | {'PASS' if r['passed'] else 'FAIL'} |")
        lines.append("")
    sp = record.get("speed")
    if sp:
        lines += ["## Kernel speed (median ms)", "",
                  f"dense attention ({sp['dense_attention']}): {sp['dense_attention_ms']:.3f} ms; softmax column sums "
                  f"(dense steps only): {sp['column_sums_ms (dense steps only)']:.3f} ms"
                  + (f", {sp['column_sums_with_fa3_lse_ms']:.3f} ms from FA3's log-sum-exp"
                     if sp.get("column_sums_with_fa3_lse_ms") else "")
                  + f"; dense MLP: {sp['dense_mlp_ms']:.3f} ms", "",
                  "| top_keys | keys | ms | speedup |", "|---|---|---|---|"]
        lines += [f"| {r['top_keys']} | {r['keys']} | {r['ms']:.3f} | "
                  f"{r['speedup_vs_dense']:.2f}x |" for r in sp["attention"]]
        lines += ["", "MLP neuron sets: independent random per token block (worst case, the target's), or one set "
                  "shared by all blocks (best case for weight reuse through L2)."]
        tma = any("tma_ms" in r for r in sp["mlp"])  # sparse_mlp(tma=True) timed beside (Triton kernels only)
        if tma:
            lines += ["ms: the pointer kernels (`sparse_mlp(tma=False)`). TMA: `sparse_mlp(tma=True)` (X and the deltas "
                      "through TMA descriptors; the layers' path on Hopper), its speedup over the pointer kernels and "
                      "its output cache's relative error against theirs."]
        if sp.get("mlp_tma_error"):
            lines += [f"TMA kernels failed (no timings after it): {sp['mlp_tma_error']}"]
        f8 = any("float8_ms" in r for r in sp["mlp"])  # mlp.is_fp8's sparse step timed beside (Triton kernels only)
        if f8:
            lines += ["float8: mlp.is_fp8's sparse step (x quantized per token, W1's and W2's float8 rows), its speedup "
                      "over the bf16 pointer kernels and its output-cache update's relative error against theirs."]
        if sp.get("mlp_float8_error"):
            lines += [f"float8 kernels failed (no timings after it): {sp['mlp_float8_error']}"]
        lines += ["", "| MLP neuron sets | top_keys | neurons | ms | speedup |"
                  + (" TMA ms | TMA vs pointer | TMA rel. error |" if tma else "")
                  + (" float8 ms | float8 vs bf16 | float8 rel. error |" if f8 else ""),
                  "|---|---|---|---|---|" + ("---|---|---|" if tma else "") + ("---|---|---|" if f8 else "")]
        lines += [f"| {r.get('neuron_sets', 'independent')} | {r['top_keys']} | {r['neurons']} | {r['ms']:.3f} | "
                  f"{r['speedup_vs_dense']:.2f}x |"
                  + ((f" {r['tma_ms']:.3f} | {r['tma_speedup_vs_pointer']:.2f}x | {r['tma_rel_err_vs_pointer']:.1e} |"
                      if "tma_ms" in r else " - | - | - |") if tma else "")
                  + ((f" {r['float8_ms']:.3f} | {r['float8_speedup_vs_bf16']:.2f}x | "
                      f"{r['float8_update_rel_err_vs_bf16']:.1e} |" if "float8_ms" in r else " - | - | - |")
                     if f8 else "") for r in sp["mlp"]]
        if sp.get("selection"):
            searches = [k[:-3] for k in sp["selection"][0] if k.endswith("_ms")]  # the searches, then "autotuned"
            lines += ["", "Selection kernels (ms; how the K-th largest key is found: utils.chipmunk.kernels"
                      ".SELECTION_SEARCHES; the autotuner's pick is in the table below):", "",
                      "| call | " + " | ".join(searches) + " | same indices |", "|---|" + "---|" * len(searches) + "---|"]
            lines += [f"| {r['call']} | " + " | ".join(f"{r[f'{name}_ms']:.4f}" for name in searches)
                      + f" | {'yes' if r.get('same_indices_every_search') else 'NO'} |" for r in sp["selection"]]
        if sp.get("autotuned"):
            lines += ["", "Autotuner's picks (tuning key: the kernel's size arguments):", "",
                      "| kernel | key | config |", "|---|---|---|"]
            lines += [f"| `{name}` | {key} | {config} |" for name, picks in sp["autotuned"].items()
                      for key, config in picks.items()]
        lines += ["", f"targets: {sp['targets']}", ""]
    i1 = record.get("interval1")
    if i1:
        lines += ["## interval=1 three-way check", "", f"`{i1['command']}` -> exit {i1['exit_code']}", ""]
        if i1.get("rows"):
            from utils.interval1_check import format_table

            lines += [format_table(i1["rows"]), ""]
    g = record.get("graphs")
    if g and g.get("rows"):
        lines += [f"## Chipmunk's step graphs vs eager ({g['steps']} steps, same seed, same compiled stack)", "",
                  "| run | s | rel. error vs eager 1 | bitwise | same layer decisions | graphs compiled |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['seconds']:.2f} | {r['rel_err_vs_eager_1']:.2e} | {r['bitwise_equal']} | "
                  f"{r['same_layer_decisions']} | {r.get('graphs_compiled', '')} |" for r in g["rows"]]
        lines += ["", f"graph calls: {g['calls']}; {g.get('mlps_beside_attention', g.get('mlps_selecting_beside_attention'))} single-block MLPs run their whole "
                  f"step beside the attention, started before its projections, on a side stream once their kernels are "
                  f"tuned; tolerance {g['tolerance']:.1e}: {'PASS' if g['passed'] else 'FAIL'}", ""]
        departed = [r for r in g["rows"] if r.get("first_cache_departures")]
        if departed:
            lines += ["Where a run's caches first depart from eager 1's (checksums after each step: sum, sum of |x|):",
                      "", "| run | step | layer/cache | sums | eager 1's |", "|---|---|---|---|---|"]
            lines += [f"| {r['run']} | {d['step']} | {d['cache']} | {d['sums'][0]:.9g}, {d['sums'][1]:.9g} | "
                      f"{d['expected'][0]:.9g}, {d['expected'][1]:.9g} |"
                      for r in departed for d in r["first_cache_departures"]]
            lines += [""]
    elif g:
        lines += ["## Chipmunk's step graphs vs eager", "", f"skipped: {g['skipped']}", ""]
    e2e = record.get("e2e")
    if e2e:
        lines += [f"## End to end ({e2e['steps']} steps, median of {e2e['runs']})", "",
                  "| variant | median s | mean step ms | speedup vs the dense stack of its precision |",
                  "|---|---|---|---|"]
        for r in e2e["rows"]:
            if "median_s" in r:
                lines.append(f"| {r['variant']} | {r['median_s']:.3f} | {r['step_ms']:.1f} | "
                             f"{r.get('speedup_vs_dense', float('nan')):.2f}x |")
            else:
                lines.append(f"| {r['variant']} | {r.get('skipped') or 'FAILED (exit %s)' % r.get('exit_code')} | | |")
        lines.append("")
    tr = record.get("trace")
    if tr:
        lines += [f"## Per-step host vs device time ({tr['steps']} steps, torch.profiler trace)", "",
                  "device ms: the sum of the step's kernel durations; busy: the time at least one runs (below the sum "
                  "where the side stream overlaps); span: first kernel start to last kernel end (the step's wall time "
                  "on the device)", "",
                  "| variant | step | host ms | device ms | busy ms | span ms | kernels |",
                  "|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            if "steps" not in r:
                failed = r.get("skipped") or "FAILED (exit %s)" % r.get("exit_code")
                lines.append(f"| {r['variant']} | {failed} | | | | | |")
                continue
            lines += [f"| {r['variant']} | {i} | {s['host_ms']:.1f} | {s['device_ms']:.1f} | "
                      f"{s.get('busy_ms', 0):.1f} | {s.get('span_ms', 0):.1f} | {s['kernels']} |"
                      for i, s in enumerate(r["steps"])]
        lines.append("")
    prof = record.get("profile")
    if prof:
        lines += ["## Per-kernel device time (torch.profiler, mean of 10 calls)", "", "| call | kernel | ms per call |",
                  "|---|---|---|"]
        lines += [f"| {r['call']} | {r['kernel']} | {r['ms_per_call']:.3f} |" for r in prof["rows"]]
        lines.append("")
    for name, seconds in record["part_seconds"].items():
        lines.append(f"- {name}: {seconds:.1f} s")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/chipmunk")
    parser.add_argument("--parts", default="kernels,speed,interval1,e2e")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                        help="CPU, small shapes, tiny pipeline (Triton via TRITON_INTERPRET=1 when set)")
    parser.add_argument("--budget_s", type=float, default=460, help="skip parts that would start after this")
    parser.add_argument("--interval1_steps", type=int, default=12)
    parser.add_argument("--e2e_steps", type=int, default=50)
    parser.add_argument("--e2e_runs", type=int, default=3,
                        help="timed runs per variant (median; at least 5 for a reported figure)")
    parser.add_argument("--e2e_variants", default=E2E_DEFAULT,
                        help=f"which e2e variants run, comma-separated, from {', '.join(E2E_VARIANTS)}")
    parser.add_argument("--e2e_float8", action="store_true",
                        help="e2e also times the dense stack and Chipmunk with float8 linears, and Chipmunk with its "
                             "MLP in float8 too (the default bf16 pair is Chipmunk's own comparison)")
    args = parser.parse_args()
    try:
        e2e_variant_keys(args.e2e_variants)
    except ValueError as e:
        parser.error(str(e))
    t_start = time.time()
    deadline = t_start + args.budget_s
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run on CPU")
    dtype = torch.float32 if dry else torch.bfloat16
    shapes = SMALL if dry else FLUX
    use_triton = T.TRITON_AVAILABLE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    record = {"kind": "bench_chipmunk", "command": command_line(), "environment": environment_record(device),
              "dry_run": dry, "shapes": shapes, "triton": use_triton, "triton_unavailable": T.UNAVAILABLE_REASON,
              "bf16_tolerance": BF16_TOLERANCE, "part_seconds": {}}
    name = "chipmunk_dryrun" if dry else "chipmunk_" + gpu_tag()

    def save():
        (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
        (out / f"{name}.md").write_text(markdown(record))

    ok = True
    for part in parts:
        t0 = time.time()
        if t0 > deadline:
            record[part] = {"skipped": f"budget {args.budget_s:.0f} s spent"}
            print(f"[bench_chipmunk] {part}: skipped (budget)")
            continue
        print(f"[bench_chipmunk] part {part} ...", flush=True)
        if part == "kernels":
            record["kernels"] = part_kernels(shapes, device, dtype, use_triton)
            ok &= record["kernels"].get("passed", True)
        elif part == "speed":
            record["speed"] = part_speed(shapes, device, dtype, use_triton, dry)
        elif part == "interval1":
            record["interval1"] = part_interval1(out, dry, 6 if dry else args.interval1_steps, deadline - t0)
            ok &= record["interval1"]["passed"]
        elif part == "profile":
            record["profile"] = part_profile(shapes, device, dtype)
        elif part == "graphs":
            record["graphs"] = part_graphs(out, dry, 4 if dry else 12)
            ok &= record["graphs"].get("passed", True)
        elif part == "e2e":
            record["e2e"] = part_e2e(out, dry, 4 if dry else args.e2e_steps, 1 if dry else args.e2e_runs, deadline,
                                     args.e2e_float8, args.e2e_variants)
        elif part == "trace":
            record["trace"] = part_trace(out, dry, 4 if dry else 12, deadline)
        else:
            parser.error(f"unknown part {part!r}")
        if device == "cuda":
            torch.cuda.empty_cache()
        record["part_seconds"][part] = time.time() - t0
        save()
        print(f"[bench_chipmunk] part {part} done in {time.time() - t0:.1f} s", flush=True)
    save()
    print(markdown(record))
    print(f"[bench_chipmunk] {'OK' if ok else 'FAILED'} in {time.time() - t_start:.0f} s; records {out / name}.json/.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

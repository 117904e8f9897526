"""Triton kernels for Chipmunk's sparse deltas (written for Hopper, H100 and H200; any Triton GPU runs them).

The PyTorch reference (reference.py) defines what each function must return; these compute
the same thing faster. The module imports cleanly without Triton or a GPU: TRITON_AVAILABLE is then
False, UNAVAILABLE_REASON says why, and the layers take the reference path (slowly, and say so
in the stack's status line). With TRITON_INTERPRET=1 the kernels run on CPU tensors through
Triton's interpreter (small shapes only), which is how the tests check them without a GPU.

Kernels (q, k, v in FLUX's (batch, tokens, heads, head_dim) layout, any strides with head_dim
contiguous):
  * row log-sum-exp, then softmax column sums per query group (dense steps: picks the key set);
  * sparse attention over gathered key indices with online softmax (FlashAttention-2 style loop,
    but each query tile walks its group's index list instead of all keys), plus the cached delta; one
    program per 64-row tile of a query group;
  * sparse MLP: fc1 on gathered neuron rows with fused bias + GELU(tanh), then the activation cache's
    delta (and its update) in a light gather kernel over the neuron-major cache, then fc2 on gathered rows
    of W2^T added into the output cache. On Hopper (sm_90+) fc1 and fc2 load their dense operand (X, the deltas)
    through TMA descriptors (sparse_mlp's tma; measured 1.06x at FLUX's 30% neurons on the H200, the same output).
The loops over gathered rows load their indices one step ahead (see _sparse_fc2_kernel): Triton then
software-pipelines the gathers, which tests/test_chipmunk_kernels_sm90.py checks in the sm_90 TTGIR.
"""

from __future__ import annotations

import math
import os

import torch

from utils.chipmunk import reference as R
from utils.chipmunk.reference import HASH_CONSTANTS, block_sizes, hash_offset

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
try:
    import triton
    import triton.language as tl

    _IMPORTED, UNAVAILABLE_REASON = True, ""
except Exception as e:  # noqa: BLE001 - any import failure means: use the reference path
    _IMPORTED, UNAVAILABLE_REASON = False, f"triton import failed: {type(e).__name__}: {e}"

if _IMPORTED and not (torch.cuda.is_available() or INTERPRET):
    UNAVAILABLE_REASON = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
TRITON_AVAILABLE = _IMPORTED and not UNAVAILABLE_REASON
if _IMPORTED is False and torch.cuda.is_available():
    print(f"[chipmunk] WARNING: Triton kernels unavailable ({UNAVAILABLE_REASON}); Chipmunk falls back to its "
          f"PyTorch reference, which is SLOWER than dense attention")

GELU_TANH_2C = 2.0 * math.sqrt(2.0 / math.pi)  # gelu_tanh(x) = x * sigmoid(2c (x + 0.044715 x^3))
LOG2E = 1.4426950408889634


# How the selection kernels find the K-th largest key: "bitwise" (one block-wide sum per bit, stopping early: at most
# 32, or 32 + 25 in top_and_random) or "radix" (ceil(bits / 8) histogram passes). Both give the same indices. On a GPU
# the autotuner picks the faster for the row length (search=None); an explicit search runs that one (the tests, the
# device benchmark). The interpreter runs SELECTION_SEARCH, the one the H200 picks. (Two bits per reduction lost to
# bitwise on the H200: 102 us against 65.)
SELECTION_SEARCH = "bitwise"
SELECTION_SEARCHES = ("bitwise", "radix")


def _configs(full: list[dict], interpreted: dict, pre_hook=None, **common) -> list:
    """Autotune candidates; a single small one under the interpreter (no timing there). `common`: meta-parameters
    every full config takes (the interpreted one gives its own). `pre_hook`: called with the launch's arguments before
    each config runs (the TMA kernels size their descriptors' boxes there)."""
    if INTERPRET:
        return [triton.Config(interpreted, num_warps=4, num_stages=1, pre_hook=pre_hook)]
    return [triton.Config(dict(common, **{k: v for k, v in c.items() if k not in ("w", "s")}), num_warps=c["w"],
                          num_stages=c["s"], pre_hook=pre_hook) for c in full]


# The sparse MLP GEMMs' autotune candidates (w: warps, s: stages), shared by the pointer kernels and their TMA
# candidates so that the two are timed over the same tiles. Configs that spill on sm_90 are not listed
# (tests/test_chipmunk_kernels_sm90.py compiles every one at FLUX shapes): see the kernels' comments.
_FC1_TILES = [dict(BLOCK_K=64, BLOCK_D=64, w=8, s=3), dict(BLOCK_K=64, BLOCK_D=64, w=8, s=4),
              dict(BLOCK_K=128, BLOCK_D=64, w=8, s=3), dict(BLOCK_K=128, BLOCK_D=64, w=8, s=4),
              dict(BLOCK_K=64, BLOCK_D=128, w=8, s=3), dict(BLOCK_K=256, BLOCK_D=64, w=8, s=3),
              dict(BLOCK_K=128, BLOCK_D=128, w=8, s=3), dict(BLOCK_K=128, BLOCK_D=32, w=8, s=6)]
# fc1 in float8 (mlp.is_fp8): a float8 element is half a bf16 one, so the tiles go twice as deep along DM for the same
# shared memory; 256-neuron tiles spill (255 registers: the scales' multiply in the epilogue).
_FC1_FP8_TILES = [dict(BLOCK_K=64, BLOCK_D=128, w=8, s=3), dict(BLOCK_K=64, BLOCK_D=128, w=8, s=4),
                  dict(BLOCK_K=128, BLOCK_D=128, w=8, s=3), dict(BLOCK_K=128, BLOCK_D=128, w=8, s=4),
                  dict(BLOCK_K=64, BLOCK_D=256, w=8, s=3), dict(BLOCK_K=128, BLOCK_D=256, w=8, s=3),
                  dict(BLOCK_K=64, BLOCK_D=64, w=8, s=4), dict(BLOCK_K=128, BLOCK_D=64, w=8, s=4)]
# fc2 in float8 (pointer kernel only): the tiles twice as deep along the neurons for the same shared memory;
# 256-column tiles spill. Hopper's float8 wgmma takes its B operand K-major, and W2^T's gathered rows are N-major:
# Triton transposes the tile in shared memory, which the TMA kernel's loop then does not software-pipeline
# (tests/test_chipmunk_kernels_sm90.py found it; the pointer kernel's loop pipelines).
_FC2_FP8_TILES = [dict(BLOCK_N=128, BLOCK_K=128, w=8, s=3), dict(BLOCK_N=128, BLOCK_K=128, w=8, s=4),
                  dict(BLOCK_N=128, BLOCK_K=64, w=8, s=4), dict(BLOCK_N=64, BLOCK_K=128, w=8, s=4),
                  dict(BLOCK_N=128, BLOCK_K=256, w=8, s=3)]
_FC2_TILES = [dict(BLOCK_N=128, BLOCK_K=64, w=8, s=3), dict(BLOCK_N=64, BLOCK_K=64, w=4, s=4),
              dict(BLOCK_N=128, BLOCK_K=32, w=8, s=4), dict(BLOCK_N=128, BLOCK_K=128, w=8, s=3),
              dict(BLOCK_N=128, BLOCK_K=64, w=8, s=4), dict(BLOCK_N=128, BLOCK_K=64, w=8, s=5),
              dict(BLOCK_N=64, BLOCK_K=64, w=8, s=3), dict(BLOCK_N=64, BLOCK_K=64, w=8, s=4),
              dict(BLOCK_N=256, BLOCK_K=64, w=8, s=3), dict(BLOCK_N=256, BLOCK_K=64, w=8, s=4)]


def _row_tile(rows_per_group: int, cap: int) -> int:
    """Largest power-of-two tile <= cap dividing the group, so that a tile never straddles two groups."""
    for tile in (128, 64, 32, 16):
        if tile <= cap and rows_per_group % tile == 0:
            return tile
    raise ValueError(f"Chipmunk Triton kernels need the group/block size ({rows_per_group}) to be a multiple of 16")


def _selection_configs() -> list:
    """Every search for the K-th largest key at each warp count: the autotuner times them on the GPU at hand. Each
    block-wide sum is a barrier, and a row is one program (34 rows of 12,288 neurons: the selection is latency-bound).
    bitwise takes at most 32 sums (57 in top_and_random), radix 4 histogram passes (8), but how tl.histogram lowers
    depends on the Triton version (per-element shared-memory atomics in 3.8, ballots before): on the H200 with Triton
    3.6, top_and_random took 65 us bitwise (with its early exit) and 146 us radix.
    Each row length keeps two warp counts (_selection_warps_only)."""
    if INTERPRET:
        return [triton.Config({"SEARCH": SELECTION_SEARCH}, num_warps=4, num_stages=1)]
    return [triton.Config({"SEARCH": search}, num_warps=w, num_stages=1) for search in SELECTION_SEARCHES
            for w in (4, 8, 16)]


def _selection_warps_only(configs: list, named_args: dict, **kwargs) -> list:
    """Keeps the warp count the row length needs (fewer warps spill a 16,384-key row) and twice that up to 16: the
    rounds of a search run one after another, and each round's per-thread work halves with the keys per thread (an
    8,192-key row, FLUX's attention key sets: 32 keys a thread at 8 warps, 16 at 16). On the H200 the autotuner kept
    8 warps for the key sets. 32 warps leave 64 registers a thread, and top_and_random spills there
    (16-48 bytes on sm_90)."""
    block = kwargs.get("BLOCK", named_args.get("BLOCK"))
    fewest = _selection_warps(block)
    return [c for c in configs if c.num_warps in (fewest, min(16, 2 * fewest))]


def _fc1_tma_box(nargs: dict) -> None:
    """Pre-hook of _sparse_fc1_tma_kernel's configs: X's descriptor is built on the host before the autotuner picks a
    config, so its box (the tile one TMA copy brings) is set to the config's tile here, before each launch."""
    nargs["X_DESC"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_D"]]


def _fc2_tma_box(nargs: dict) -> None:
    """Pre-hook of _sparse_fc2_tma_kernel's configs: DELTA's descriptor box is the config's tile (see _fc1_tma_box)."""
    nargs["DELTA_DESC"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]


if _IMPORTED:  # defined even without a GPU, so that tests can compile them ahead of time for sm_90

    # --- attention: dense-step column sums ---------------------------------------------------------

    @triton.jit
    def _row_lse_kernel(Q, K, LSE, sqb, sql, sqh, skb, skl, skh, L, LK, H, scale_log2,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + d[None, :], mask=rows[:, None] < L, other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_sum = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, LK, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = tl.load(K + b * skb + h * skh + cols[:, None] * skl + d[None, :], mask=cols[:, None] < LK, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            s = tl.where(cols[None, :] < LK, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            s_sum = s_sum * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
        tl.store(LSE + bh * L + rows, m + tl.log2(s_sum), mask=rows < L)  # log2 domain

    # One program per K tile of one head walks the row tiles of GROUPS_PER_PROGRAM consecutive query groups in one flat
    # loop (Triton software-pipelines its Q loads), summing the probabilities in a 2D accumulator that is reduced over
    # the rows, stored and reset only at a group's last tile. On the H200 (L=4352, 24 heads of 128, GROUP=192) the
    # first kernel (a program per K tile and group, a row sum per 64-row tile) took 497 us, 233 TFLOP/s for its QK^T
    # pass; the flat loop alone still ~490 us (a row sum crosses warps every tile); with the 2D accumulator 283-330 us
    # for the configs below (a standalone sweep on the H200).
    @triton.autotune(configs=_configs([dict(BLOCK_N=128, GROUPS_PER_PROGRAM=4, w=4, s=2),
                                       dict(BLOCK_N=128, GROUPS_PER_PROGRAM=8, w=4, s=2),
                                       dict(BLOCK_N=128, GROUPS_PER_PROGRAM=8, w=4, s=3),
                                       dict(BLOCK_N=64, GROUPS_PER_PROGRAM=8, w=4, s=2),
                                       dict(BLOCK_N=128, GROUPS_PER_PROGRAM=8, w=8, s=3)],
                                      dict(BLOCK_N=16, GROUPS_PER_PROGRAM=2)), key=["L", "LK", "D", "GROUP"])
    @triton.jit
    def _column_sum_kernel(Q, K, LSE, OUT, sqb, sql, sqh, skb, skl, skh, L, LK, H, G, scale_log2,
                           D: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           GROUPS_PER_PROGRAM: tl.constexpr):
        pid_n, pid_g, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        TILES: tl.constexpr = GROUP // BLOCK_M  # row tiles per group
        g0 = pid_g * GROUPS_PER_PROGRAM
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skl + d[None, :], mask=cols[:, None] < LK, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for t in range(tl.minimum(GROUPS_PER_PROGRAM, G - g0) * TILES):  # the last program may get fewer groups
            rows = g0 * GROUP + t * BLOCK_M + tl.arange(0, BLOCK_M)
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + d[None, :], mask=rows[:, None] < L, other=0.0)
            lse = tl.load(LSE + bh * L + rows, mask=rows < L, other=float("inf"))  # rows past L: exp2(-inf) = 0
            acc += tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])
            if t % TILES == TILES - 1:
                tl.store(OUT + (bh * G + g0 + t // TILES) * LK + cols, tl.sum(acc, 0), mask=cols < LK)
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)

    # --- attention: sparse over gathered keys ------------------------------------------------------

    @triton.autotune(configs=_configs([dict(BLOCK_N=64, w=4, s=3), dict(BLOCK_N=128, w=8, s=3),
                                       dict(BLOCK_N=64, w=4, s=4), dict(BLOCK_N=128, w=4, s=2)],
                                      dict(BLOCK_N=16)), key=["L", "NK", "D", "GROUP"])
    @triton.jit
    def _sparse_attention_kernel(Q, K, V, IDX, OC, O, sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
                                 L, H, G, NK, scale_log2, D: tl.constexpr, GROUP: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_CACHE: tl.constexpr,
                                 SUBTRACT: tl.constexpr, EVEN_N: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        g = (pid_m * BLOCK_M) // GROUP
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + d[None, :], mask=rows[:, None] < L, other=0.0)
        index = IDX + (bh * G + g) * NK
        k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # Key indices loaded one tile ahead and carried, so that the K/V gathers pipeline (see _sparse_fc2_kernel).
        next_key = tl.load(index + tl.arange(0, BLOCK_N), mask=tl.arange(0, BLOCK_N) < NK, other=0)
        for start in range(0, NK, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            key = next_key
            next_key = tl.load(index + j + BLOCK_N, mask=j + BLOCK_N < NK, other=0)
            k = tl.load(k_base + key[:, None] * skl + d[None, :])
            v = tl.load(v_base + key[:, None] * svl + d[None, :])
            s = tl.dot(q, tl.trans(k)) * scale_log2
            if not EVEN_N:  # every tile full: no score mask
                s = tl.where((j < NK)[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            s_sum = s_sum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / s_sum[:, None]
        offsets = b * sob + h * soh + rows[:, None] * sol + d[None, :]
        if HAS_CACHE:  # a sparse step: o_cache + A_S; a dense step (SUBTRACT): O_dense - A_S, the new o_cache
            base = tl.load(OC + offsets, mask=rows[:, None] < L, other=0.0).to(tl.float32)
            out = base - out if SUBTRACT else base + out
        tl.store(O + offsets, out.to(O.dtype.element_ty), mask=rows[:, None] < L)

    # --- MLP: fc1 on gathered neurons, fused bias + GELU; then the activation-cache delta ----------------

    # fc1 writes the new activations of the selected neurons compactly, (B, L, NK): a plain contiguous epilogue
    # leaves registers for 128-neuron tiles. The gathered read-modify-write of the activation cache is a separate
    # light kernel (_activation_delta_kernel). Configs that spill on sm_90 are not listed
    # (tests/test_chipmunk_kernels_sm90.py compiles every one at FLUX shapes; 128x128 tiles at 4 warps spill).
    # The last three (sm_90 registers, shared memory): the 128x256 tile (255, 144 KB), a 128-deep DM step (177,
    # 192 KB), and a 128x128 tile at 128 registers and 96 KB, so two CTAs per SM (one's epilogue under the other's
    # loop).
    @triton.autotune(configs=_configs(_FC1_TILES, dict(BLOCK_K=16, BLOCK_D=16)),
                     key=["L", "NK", "DM", "BLOCK_M"], reset_to_zero=["PRESUM"])
    @triton.jit
    def _sparse_fc1_kernel(X, W1, B1, IDX, NEW, PRESUM, XS, WS, sxb, sxl, snb, snl, L, DM, NK, NB, TOKENS_PER_BLOCK,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                           FP8: tl.constexpr):
        # Row tiles vary fastest: the programs in flight then share one neuron tile position across all token blocks,
        # whose sorted neuron sets cover similar W1 rows, so gathered weights come from L2 instead of DRAM.
        pid_m, pid_k, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        blk = (pid_m * BLOCK_M) // TOKENS_PER_BLOCK
        j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        jvalid = j < NK
        neuron = tl.load(IDX + (b * NB + blk) * NK + j, mask=jvalid, other=0)
        acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        # EVEN_D (every tile full along DM): no column masks in the loop, ~8% fewer SASS instructions per step on
        # sm_90. The row mask stays: clamping rows instead (as fc2 does) cost 16 registers at BLOCK_K = BLOCK_D = 64,
        # a third CTA per SM.
        x_ptr = X + b * sxb + rows[:, None] * sxl
        w_ptr = W1 + neuron[:, None] * DM
        for d0 in range(0, DM, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            if EVEN_D:
                x = tl.load(x_ptr + dd[None, :], mask=rows[:, None] < L, other=0.0)
                w = tl.load(w_ptr + dd[None, :])
            else:
                x = tl.load(x_ptr + dd[None, :], mask=(rows[:, None] < L) & (dd[None, :] < DM), other=0.0)
                w = tl.load(w_ptr + dd[None, :], mask=dd[None, :] < DM, other=0.0)
            acc += tl.dot(x, tl.trans(w))
        acc = _fc1_scales(acc, XS, WS, b, rows, neuron, L, FP8)
        _fc1_epilogue(acc, B1, neuron, PRESUM, NEW, b, blk, rows, j, jvalid, snb, snl, L, NK, NB)

    _sparse_fc1_fp8_kernel = triton.autotune(configs=_configs(_FC1_FP8_TILES, dict(BLOCK_K=16, BLOCK_D=16)),
                                             key=["L", "NK", "DM", "BLOCK_M"], reset_to_zero=["PRESUM"])(
        _sparse_fc1_kernel.fn)  # the same kernel with FP8 on, tuned over its own tiles

    @triton.jit
    def _fc1_scales(acc, XS, WS, b, rows, neuron, L, FP8: tl.constexpr):
        """float8 operands (FP8): the exact float32 sums of float8 products, times each token's scale (XS, (B, L))
        and each gathered neuron's weight-row scale (WS, (hidden,)); bf16 operands: acc as it is."""
        if FP8:
            acc = acc * tl.load(XS + b * L + rows, mask=rows < L, other=0.0)[:, None] \
                * tl.load(WS + neuron).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _fc1_epilogue(acc, B1, neuron, PRESUM, NEW, b, blk, rows, j, jvalid, snb, snl, L, NK, NB):
        """fc1's tile: + bias, its block sums into PRESUM (rows past L left out), GELU(tanh), stored compactly into
        NEW for _activation_delta_kernel. (Doing the activation delta here instead, without writing and re-reading
        NEW, measured 0.98-0.99x at FLUX's 30% of neurons on the H200: the epilogue's registers cost the loop more.)"""
        pre = acc + tl.load(B1 + neuron).to(tl.float32)[None, :]
        tl.atomic_add(PRESUM + (b * NB + blk) * NK + j, tl.sum(tl.where(rows[:, None] < L, pre, 0.0), 0), mask=jvalid)
        z2 = 1.5957691216057308 * (pre + 0.044715 * pre * pre * pre)  # 2z, with 2 sqrt(2/pi) = GELU_TANH_2C
        act = pre / (1.0 + tl.exp(-z2))  # gelu_tanh(x) = x * sigmoid(2z)
        mask = (rows[:, None] < L) & jvalid[None, :]
        tl.store(NEW + b * snb + rows[:, None] * snl + j[None, :], act.to(NEW.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_w2t_rows(w_ptr, jvalid, cols, NOUT, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
        """A tile of gathered W2^T rows, with only the masks the shapes need (none when every tile is full)."""
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptr)
        elif EVEN_K:
            w = tl.load(w_ptr, mask=cols[None, :] < NOUT, other=0.0)
        elif EVEN_N:
            w = tl.load(w_ptr, mask=jvalid[:, None], other=0.0)
        else:
            w = tl.load(w_ptr, mask=jvalid[:, None] & (cols[None, :] < NOUT), other=0.0)
        return w

    @triton.jit
    def _activation_delta_kernel(NEW, IDX, ACT, DELTA, PRESUM, PREMEAN, snb, snl, sab, sal, sak, sdb, sdl, spb, spn,
                                 L, NK, NB, TOKENS_PER_BLOCK, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                 WRITE_MEANS: tl.constexpr):
        """delta = new - act_cache[selected]; act_cache[selected] = new (new is already in the cache's dtype, so
        the deltas telescope exactly in it). With a neuron-major cache (sal == 1, as the MLP layer keeps it for
        this kernel) each selected neuron's tokens are contiguous, so the gather is coalesced; a token-major cache
        splits it into 2-byte accesses (0.33 ms on the H100 at FLUX shapes, ~7x its traffic at full bandwidth).
        WRITE_MEANS: the first row tile of each token block also writes its selected neurons' pre-activation block
        means (fc1's sums over the block's tokens, complete once fc1 has run) into their places in PREMEAN (B, nb,
        hidden): the layer's reference for the next change, without a division and a scatter launched after."""
        pid_m, pid_k, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        blk = (pid_m * BLOCK_M) // TOKENS_PER_BLOCK
        j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < L) & (j[None, :] < NK)
        neuron = tl.load(IDX + (b * NB + blk) * NK + j, mask=j < NK, other=0)
        if WRITE_MEANS:
            if (pid_m * BLOCK_M) % TOKENS_PER_BLOCK == 0:
                count = tl.minimum(TOKENS_PER_BLOCK, L - blk * TOKENS_PER_BLOCK).to(tl.float32)
                sums = tl.load(PRESUM + (b * NB + blk) * NK + j, mask=j < NK, other=0.0)
                # Rounded as torch's division rounds (IEEE), not Triton's default approximate float32 division.
                tl.store(PREMEAN + b * spb + blk * spn + neuron, tl.math.div_rn(sums, count), mask=j < NK)
        new = tl.load(NEW + b * snb + rows[:, None] * snl + j[None, :], mask=mask, other=0.0)
        act_ptr = ACT + b * sab + rows[:, None] * sal + neuron[None, :] * sak
        delta = new.to(tl.float32) - tl.load(act_ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + b * sdb + rows[:, None] * sdl + j[None, :], delta.to(DELTA.dtype.element_ty), mask=mask)
        tl.store(act_ptr, new, mask=mask)

    # --- MLP: a dense step's epilogue over the transposed pre-activations ---------------------------------

    @triton.jit
    def _dense_mlp_epilogue_kernel(PRE, B1, ACT, MEANS, spb, sph, sab, sah, L, HIDDEN, NB, TOKENS_PER_BLOCK,
                                   BLOCK_H: tl.constexpr, BM: tl.constexpr):
        """One tile of BLOCK_H neurons x one token block of (B, hidden, L) = W1 x^T: adds the bias, writes GELU(tanh)
        into the neuron-major activation cache, and stores the block's mean pre-activation per neuron."""
        pid_h, blk, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        start = blk * TOKENS_PER_BLOCK
        end = tl.minimum(start + TOKENS_PER_BLOCK, L)
        t = start + tl.arange(0, BM)  # BM: the block size rounded up to a power of two
        mask = (h[:, None] < HIDDEN) & (t[None, :] < end)
        pre = tl.load(PRE + b * spb + h[:, None] * sph + t[None, :], mask=mask, other=0.0).to(tl.float32)
        pre += tl.load(B1 + h, mask=h < HIDDEN, other=0.0).to(tl.float32)[:, None]
        count = (end - start).to(tl.float32)
        tl.store(MEANS + (b * NB + blk) * HIDDEN + h, tl.sum(tl.where(mask, pre, 0.0), 1) / count, mask=h < HIDDEN)
        z2 = 1.5957691216057308 * (pre + 0.044715 * pre * pre * pre)  # gelu_tanh(x) = x * sigmoid(2z), as in fc1
        tl.store(ACT + b * sab + h[:, None] * sah + t[None, :], (pre / (1.0 + tl.exp(-z2))).to(ACT.dtype.element_ty),
                 mask=mask)

    # --- MLP: fc2 on gathered rows of W2^T, added into the output cache -----------------------------

    # The epilogue adds the tile into the float32 cache EPILOGUE_N columns at a time: the accumulator's column chunks
    # (tl.reshape + tl.permute + tl.split, as Triton's persistent matmul tutorial subtiles its epilogue) load, add and
    # store their part of the cache one after another, so that only a chunk of the cache tile is live beside the
    # accumulator. Same sums, same rounding. sm_90 with Triton 3.8's ptxas at FLUX shapes, whole-tile -> 64-column
    # epilogue: 128x256 at 8 warps 255 registers + 344 B spilled -> 212 registers, no spills (its only config change:
    # ~12 KB loaded from L2 per MFLOP against ~16 KB at 128x128, and fc2 ran at ~395 TFLOP/s on the H200, likely bound
    # by L2 -> SM traffic); 128x128 194 -> 128 (138 at BLOCK_K=128), so that BLOCK_K 64 at 3 stages and 32 at 4 could
    # now fit two CTAs per SM (not yet measured on a GPU: the autotuner decides); 128x128 at 4 warps 255 + 328 B
    # spilled -> 244 (not listed). 128x64 tiles are one chunk, unchanged: 104 registers at 8 warps, 212 at 4 (two CTAs
    # per SM, one's epilogue under the other's loop). 32-column chunks would give ~198 at 128x256, 124 at 128x128.
    @triton.autotune(configs=_configs(_FC2_TILES, dict(BLOCK_N=16, BLOCK_K=16, EPILOGUE_N=4), EPILOGUE_N=64),
                     key=["L", "NK", "NOUT", "BLOCK_M"], restore_value=["OUT"])
    @triton.jit
    def _sparse_fc2_kernel(DELTA, W2T, IDX, OUT, LOW, DS, WS, sdb, sdl, sob, sol, slb, sll, L, NK, NOUT, NB,
                           TOKENS_PER_BLOCK, WRITE_LOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, EPILOGUE_N: tl.constexpr, EVEN_K: tl.constexpr,
                           EVEN_N: tl.constexpr, FP8: tl.constexpr):
        pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # row tiles fastest, as in fc1:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the programs in flight share a W2^T column slice (L2)
        blk = (pid_m * BLOCK_M) // TOKENS_PER_BLOCK
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # The neuron indices are loaded one K step ahead and carried: a W2^T gather whose addresses come from a load
        # in the same iteration defeats Triton's software pipeline (single-buffered, wait-all each step: memory
        # latency exposed, ~half of fc1's FLOP rate on the H100); carried indices pipeline like fc1's loads.
        index = IDX + (b * NB + blk) * NK
        # Rows past L read row L - 1 (their sums are never stored) and, with EVEN_K and EVEN_N (every tile full), the
        # loop's loads carry no predicates: a quarter fewer SASS instructions per step on sm_90, registers unchanged.
        delta_rows = DELTA + b * sdb + tl.minimum(rows, L - 1)[:, None] * sdl
        next_neuron = tl.load(index + tl.arange(0, BLOCK_K), mask=tl.arange(0, BLOCK_K) < NK, other=0)
        for k0 in range(0, NK, BLOCK_K):
            j = k0 + tl.arange(0, BLOCK_K)
            jvalid = j < NK
            neuron = next_neuron
            next_neuron = tl.load(index + j + BLOCK_K, mask=j + BLOCK_K < NK, other=0)
            w_ptr = W2T + neuron[:, None] * NOUT + cols[None, :]
            if EVEN_K:
                delta = tl.load(delta_rows + j[None, :])
            else:
                delta = tl.load(delta_rows + j[None, :], mask=jvalid[None, :], other=0.0)
            w = _load_w2t_rows(w_ptr, jvalid, cols, NOUT, EVEN_K, EVEN_N)
            acc += tl.dot(delta, w)
        acc = _fc2_scales(acc, DS, WS, b, rows, cols, L, NOUT, FP8)
        _fc2_epilogue(acc, OUT, LOW, b, rows, pid_n * BLOCK_N, sob, sol, slb, sll, L, NOUT, WRITE_LOW, BLOCK_M,
                      BLOCK_N, EPILOGUE_N)

    @triton.jit
    def _fc2_scales(acc, DS, WS, b, rows, cols, L, NOUT, FP8: tl.constexpr):
        """float8 operands (FP8): the float32 sums times each token's delta scale (DS, (B, L)) and each output
        column's W2 row scale (WS, (out,)); bf16 operands: acc as it is."""
        if FP8:
            acc = acc * tl.load(DS + b * L + rows, mask=rows < L, other=0.0)[:, None] \
                * tl.load(WS + cols, mask=cols < NOUT, other=0.0)[None, :]
        return acc

    @triton.jit
    def _fc2_epilogue(acc, OUT, LOW, b, rows, c0, sob, sol, slb, sll, L, NOUT, WRITE_LOW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPILOGUE_N: tl.constexpr):
        """fc2's cache update in BLOCK_N // EPILOGUE_N (1, 2 or 4) column chunks, one after another (see above)."""
        tl.static_assert(BLOCK_N == EPILOGUE_N or BLOCK_N == 2 * EPILOGUE_N or BLOCK_N == 4 * EPILOGUE_N)
        if BLOCK_N == EPILOGUE_N:
            _fc2_update_cache(acc, OUT, LOW, b, rows, c0, sob, sol, slb, sll, L, NOUT, WRITE_LOW, EPILOGUE_N)
        elif BLOCK_N == 2 * EPILOGUE_N:
            h0, h1 = _column_halves(acc, BLOCK_M, BLOCK_N)
            _fc2_update_cache(h0, OUT, LOW, b, rows, c0, sob, sol, slb, sll, L, NOUT, WRITE_LOW, EPILOGUE_N)
            _fc2_update_cache(h1, OUT, LOW, b, rows, c0 + EPILOGUE_N, sob, sol, slb, sll, L, NOUT, WRITE_LOW,
                              EPILOGUE_N)
        else:
            h0, h1 = _column_halves(acc, BLOCK_M, BLOCK_N)
            q0, q1 = _column_halves(h0, BLOCK_M, BLOCK_N // 2)
            q2, q3 = _column_halves(h1, BLOCK_M, BLOCK_N // 2)
            _fc2_update_cache(q0, OUT, LOW, b, rows, c0, sob, sol, slb, sll, L, NOUT, WRITE_LOW, EPILOGUE_N)
            _fc2_update_cache(q1, OUT, LOW, b, rows, c0 + EPILOGUE_N, sob, sol, slb, sll, L, NOUT, WRITE_LOW,
                              EPILOGUE_N)
            _fc2_update_cache(q2, OUT, LOW, b, rows, c0 + 2 * EPILOGUE_N, sob, sol, slb, sll, L, NOUT, WRITE_LOW,
                              EPILOGUE_N)
            _fc2_update_cache(q3, OUT, LOW, b, rows, c0 + 3 * EPILOGUE_N, sob, sol, slb, sll, L, NOUT, WRITE_LOW,
                              EPILOGUE_N)

    @triton.jit
    def _column_halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
        """x[:, :COLS // 2] and x[:, COLS // 2:] of a (ROWS, COLS) tile (tl.split halves the last dim, of size 2)."""
        return tl.split(tl.permute(tl.reshape(x, [ROWS, 2, COLS // 2]), [0, 2, 1]))

    @triton.jit
    def _fc2_update_cache(acc, OUT, LOW, b, rows, c0, sob, sol, slb, sll, L, NOUT, WRITE_LOW: tl.constexpr,
                          WIDTH: tl.constexpr):
        """Adds acc, columns c0 .. c0 + WIDTH of fc2's tile, into the float32 cache (and its rounded copy)."""
        cols = c0 + tl.arange(0, WIDTH)
        mask = (rows[:, None] < L) & (cols[None, :] < NOUT)
        out_ptr = OUT + b * sob + rows[:, None] * sol + cols[None, :]
        updated = tl.load(out_ptr, mask=mask, other=0.0) + acc
        tl.store(out_ptr, updated, mask=mask)
        if WRITE_LOW:  # the layer's output in the model's dtype, here instead of a pass over the float32 cache
            tl.store(LOW + b * slb + rows[:, None] * sll + cols[None, :], updated.to(LOW.dtype.element_ty), mask=mask)

    # --- MLP on Hopper: the dense operand through TMA -----------------------------------------------------------

    # _sparse_fc1_kernel and _sparse_fc2_kernel with their dense operand (X in fc1, DELTA in fc2) loaded through a
    # host-side TMA descriptor over its (B * L, width) view instead of pointer loads (cp.async), the gathered weight
    # rows still pointer loads. TMA takes the dense tile's address math and predicates off the loop. On the H200
    # (Triton 3.6) they ran 1.02-1.07x faster than the pointer kernels at 10-70% of the neurons, 1.06x at FLUX's 30%
    # (0.459 against 0.485 ms), with outputs equal bit for bit:
    # sparse_mlp uses them by default where TMA exists. Separate kernels, so the pointer ones stay for other GPUs.
    # Rows past L are the next batch's first rows (or zeros past B * L: TMA fills out-of-bounds boxes with zeros, as
    # it does columns past the width): their sums are never stored, as in the kernels above.
    @triton.autotune(configs=_configs(_FC1_TILES, dict(BLOCK_K=16, BLOCK_D=16), pre_hook=_fc1_tma_box),
                     key=["L", "NK", "DM", "BLOCK_M"], reset_to_zero=["PRESUM"])
    @triton.jit
    def _sparse_fc1_tma_kernel(X_DESC, W1, B1, IDX, NEW, PRESUM, XS, WS, snb, snl, L, DM, NK, NB, TOKENS_PER_BLOCK,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                               EVEN_D: tl.constexpr, FP8: tl.constexpr):
        pid_m, pid_k, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # row tiles fastest (L2), as in fc1
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        blk = (pid_m * BLOCK_M) // TOKENS_PER_BLOCK
        j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        jvalid = j < NK
        neuron = tl.load(IDX + (b * NB + blk) * NK + j, mask=jvalid, other=0)
        acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        x_row = b * L + pid_m * BLOCK_M  # the tile's first row in the (B * L, DM) view
        w_ptr = W1 + neuron[:, None] * DM
        for d0 in range(0, DM, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            x = X_DESC.load([x_row, d0])  # columns past DM come back zero
            if EVEN_D:
                w = tl.load(w_ptr + dd[None, :])
            else:
                w = tl.load(w_ptr + dd[None, :], mask=dd[None, :] < DM, other=0.0)
            acc += tl.dot(x, tl.trans(w))
        acc = _fc1_scales(acc, XS, WS, b, rows, neuron, L, FP8)
        _fc1_epilogue(acc, B1, neuron, PRESUM, NEW, b, blk, rows, j, jvalid, snb, snl, L, NK, NB)

    _sparse_fc1_tma_fp8_kernel = triton.autotune(
        configs=_configs(_FC1_FP8_TILES, dict(BLOCK_K=16, BLOCK_D=16), pre_hook=_fc1_tma_box),
        key=["L", "NK", "DM", "BLOCK_M"], reset_to_zero=["PRESUM"])(_sparse_fc1_tma_kernel.fn)

    @triton.autotune(configs=_configs(_FC2_TILES, dict(BLOCK_N=16, BLOCK_K=16, EPILOGUE_N=4),
                                      pre_hook=_fc2_tma_box, EPILOGUE_N=64),
                     key=["L", "NK", "NOUT", "BLOCK_M"], restore_value=["OUT"])
    @triton.jit
    def _sparse_fc2_tma_kernel(DELTA_DESC, W2T, IDX, OUT, LOW, DS, WS, sob, sol, slb, sll, L, NK, NOUT, NB,
                               TOKENS_PER_BLOCK, WRITE_LOW: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPILOGUE_N: tl.constexpr,
                               EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, FP8: tl.constexpr):
        pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # row tiles fastest (L2), as in fc2
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        blk = (pid_m * BLOCK_M) // TOKENS_PER_BLOCK
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        index = IDX + (b * NB + blk) * NK
        delta_row = b * L + pid_m * BLOCK_M  # the tile's first row in the (B * L, NK) view
        # Neuron indices one K step ahead, carried, so that the W2^T gathers pipeline (see _sparse_fc2_kernel).
        next_neuron = tl.load(index + tl.arange(0, BLOCK_K), mask=tl.arange(0, BLOCK_K) < NK, other=0)
        for k0 in range(0, NK, BLOCK_K):
            j = k0 + tl.arange(0, BLOCK_K)
            jvalid = j < NK
            neuron = next_neuron
            next_neuron = tl.load(index + j + BLOCK_K, mask=j + BLOCK_K < NK, other=0)
            w_ptr = W2T + neuron[:, None] * NOUT + cols[None, :]
            delta = DELTA_DESC.load([delta_row, k0])  # columns past NK come back zero
            w = _load_w2t_rows(w_ptr, jvalid, cols, NOUT, EVEN_K, EVEN_N)
            acc += tl.dot(delta, w)
        acc = _fc2_scales(acc, DS, WS, b, rows, cols, L, NOUT, FP8)
        _fc2_epilogue(acc, OUT, LOW, b, rows, pid_n * BLOCK_N, sob, sol, slb, sll, L, NOUT, WRITE_LOW, BLOCK_M,
                      BLOCK_N, EPILOGUE_N)  # the same sums and rounding as _sparse_fc2_kernel's

    # fc2 with FP8 on, tuned over its own tiles (see _sparse_fc1_fp8_kernel); the pointer kernel only.
    _sparse_fc2_fp8_kernel = triton.autotune(
        configs=_configs(_FC2_FP8_TILES, dict(BLOCK_N=16, BLOCK_K=16, EPILOGUE_N=4), EPILOGUE_N=64),
        key=["L", "NK", "NOUT", "BLOCK_M"], restore_value=["OUT"])(_sparse_fc2_kernel.fn)

    # --- key / neuron selection: top-k per row, indices ascending -----------------------------------

    @triton.jit
    def _kth_largest(key, valid, K, BITS: tl.constexpr, SEARCH: tl.constexpr):
        """A threshold that picks the top K of the valid int32 keys (signed order): the K-th largest key (the largest
        t with count(key >= t) >= K), or, where bitwise stops early, a smaller t with exactly K keys at or above it;
        _take_ascending picks the same entries from either. BITS=32 searches all int32 keys; BITS < 32, keys in
        [0, 2^BITS)."""
        if SEARCH == "radix":
            return _kth_largest_radix(key, valid, K, BITS)
        else:
            return _kth_largest_bitwise(key, valid, K, BITS)

    @triton.jit
    def _lanes_below_every_candidate(key, valid):
        """The keys with the lanes past the row set to INT_MIN, which no candidate of the bitwise search reaches
        (each candidate sets a bit above its threshold, which starts at INT_MIN, or at 0 for keys in [0, 2^BITS)):
        the rounds then count `key >= candidate` without and-ing `valid` into every element of every round. A valid
        key equal to INT_MIN (one NaN pattern) is never counted either, which is right: it is the smallest key."""
        return tl.where(valid, key, -2147483648)

    @triton.jit
    def _kth_largest_bitwise(key, valid, K, BITS: tl.constexpr):
        """_kth_largest bit by bit from the top: at most BITS block-wide sums, one after another. It stops at the
        first candidate with exactly K keys at or above it: that set is then the top K itself (it holds every key
        >= the K-th largest, and no tie straddles its edge), so _take_ascending picks the same entries from this
        threshold as from the K-th largest. Continuous keys separate the K-th from the (K+1)-th largest long before
        the last bit (a CPU model on random rows of FLUX's sizes: ~20 rounds of 32 for the neuron changes, ~14 of 25
        for the 24-bit noise); ties run all BITS. On the H200 the early exit took top_and_random from 85 to 65 us."""
        key = _lanes_below_every_candidate(key, valid)
        if BITS == 32:
            threshold = tl.full((), -2147483648, tl.int32)  # the search runs over key ^ 0x80000000, unsigned
        else:
            threshold = tl.zeros((), tl.int32)
        found = tl.zeros((), tl.int32)
        for bit in tl.static_range(BITS - 1, -1, -1):
            if found == 0:  # uniform over the program: the skipped rounds cost no barrier
                # Setting the bit is an xor: every lower bit of the threshold is still 0 (bit 31 of a signed
                # threshold starts set, and clearing it moves from INT_MIN to 0, the same as adding 2^31 unsigned).
                if bit == 31:
                    candidate = threshold ^ -2147483648
                else:
                    candidate = threshold ^ (1 << bit)
                count = tl.sum((key >= candidate).to(tl.int32), 0)
                threshold = tl.where(count >= K, candidate, threshold)
                found = (count == K).to(tl.int32)
        return threshold

    @triton.jit
    def _kth_largest_radix(key, valid, K, BITS: tl.constexpr):
        """_kth_largest by radix select, 8-bit digits from the top: ceil(BITS / 8) histograms instead of BITS sums.
        Each pass counts the next digit of the keys that share the threshold's digits found so far, takes the highest
        digit d with at least K of them at d or above, and leaves K minus those above d for the next digit.
        Per-element values are recomputed from `key` each pass rather than kept: 16 warps leave 128 registers."""
        PASSES: tl.constexpr = (BITS + 7) // 8
        threshold = tl.zeros((), tl.int32)  # the digits found so far, in the keys' own bits
        for p in tl.static_range(PASSES):
            shift = 8 * (PASSES - 1 - p)  # a constexpr (p is); for BITS=25 the top digit is 1 bit wide
            # Flipping the sign bit orders the top digit of signed keys as unsigned digits.
            flip = 0x80 if BITS == 32 and p == 0 else 0
            digit = ((key >> shift) & 0xFF) ^ flip
            matching = valid
            if p > 0:
                matching = matching & ((key >> (shift + 8)) == (threshold >> (shift + 8)))
            # No mask= on tl.histogram (older Tritons lack it): the other lanes count into bin 0, which is never read:
            # bin 0 is taken whenever no higher bin has K keys at or above it.
            hist = tl.histogram(tl.where(matching, digit, 0), 256)
            at_or_above = key.shape[0] - tl.cumsum(hist, 0) + hist  # right for bins >= 1; bin 0's is >= K anyway
            enough = at_or_above >= K  # true for bins 0..d: at_or_above does not increase
            d = tl.sum(enough.to(tl.int32), 0) - 1
            K -= tl.sum(tl.where(enough, 0, hist), 0)  # the matching keys above digit d are all taken
            threshold = threshold | ((d ^ flip) << shift)
        return threshold

    @triton.jit
    def _take_ascending(key, valid, threshold, K):
        """The K entries at or above the threshold, ties to the lower index: a mask over the row."""
        above = valid & (key > threshold)
        tied = valid & (key == threshold)
        take_tied = K - tl.sum(above.to(tl.int32), 0)
        return above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= take_tied))

    @triton.jit
    def _order_key(values):
        """float32 values as int32 keys of the same order (flip the magnitude bits of negatives)."""
        bits = values.to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _float_key(X, row, sx, offs, valid):
        """The row's float values as int32 keys of the same order."""
        return _order_key(tl.load(X + row * sx + offs, mask=valid, other=0.0).to(tl.float32))

    @triton.autotune(configs=_selection_configs(), key=["N", "BLOCK"],
                     prune_configs_by={"early_config_prune": _selection_warps_only})
    @triton.jit
    def _top_ascending_kernel(X, OUT, N, K, sx, so, BLOCK: tl.constexpr, SEARCH: tl.constexpr):
        """One row per program: the indices of its K largest values, ascending, ties to the lower index. A search
        (SEARCH: one of SELECTION_SEARCHES) for the K-th largest value's order-preserving key, then a compaction by running
        counts: one launch where torch.topk + an ordering pass take ~40 (the selection steps' host cost in the H100
        traces). int32 keys: int64 ones took 61 us a call for 34 rows of 12,288 on the H200."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        valid = offs < N
        key = _float_key(X, row, sx, offs, valid)
        chosen = _take_ascending(key, valid, _kth_largest(key, valid, K, 32, SEARCH), K)
        tl.store(OUT + row * so + tl.cumsum(chosen.to(tl.int32), 0) - 1, offs.to(tl.int32), mask=chosen)

    @triton.autotune(configs=_selection_configs(), key=["N", "BLOCK", "SEED_IN_TENSOR", "HAS_REF"],
                     prune_configs_by={"early_config_prune": _selection_warps_only})
    @triton.jit(do_not_specialize=["offset"])
    def _top_and_random_kernel(X, REF, OUT, SEED, offset, seed_mix, golden, mix1, mix2, N, TOP, TOTAL, sx, sr, so,
                               SEED_IN_TENSOR: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
                               SEARCH: tl.constexpr):
        """One row per program: its TOP largest values plus TOTAL - TOP others chosen at random, indices ascending,
        in one launch. The random ones are those with the highest hashed_uniform noise among the rest, the same
        numbers as reference.hashed_uniform (splitmix64 of the seed and the flat position, top 24 bits), so
        this equals top_ascending(hashed_uniform(...).scatter_(-1, top, 2.0), TOTAL) (the reference) without the
        noise tensor, the scatter and the second launch. The seed is offset (seed * seed_mix, wrapped) or, when
        SEED_IN_TENSOR, read from SEED (a device scalar that CUDA-graph replays update). HAS_REF: the scores are
        |X - REF| (float32), the change since a reference, computed here instead of by two launches before."""
        row = tl.program_id(0).to(tl.int64)
        if SEED_IN_TENSOR:  # loaded first: after the first search it cost registers that spilled (sm_90, 16 warps)
            offset = tl.load(SEED).to(tl.int64) * seed_mix  # int64 multiplication wraps, as the reference's
        offs = tl.arange(0, BLOCK)
        valid = offs < N
        if HAS_REF:
            x = tl.load(X + row * sx + offs, mask=valid, other=0.0).to(tl.float32)
            key = _order_key(tl.abs(x - tl.load(REF + row * sr + offs, mask=valid, other=0.0)))
        else:
            key = _float_key(X, row, sx, offs, valid)
        top = _take_ascending(key, valid, _kth_largest(key, valid, TOP, 32, SEARCH), TOP)
        z = (row * N + offs + 1 + offset).to(tl.uint64, bitcast=True)
        z = z * golden.to(tl.uint64, bitcast=True)
        z = (z ^ (z >> 30)) * mix1.to(tl.uint64, bitcast=True)
        z = (z ^ (z >> 27)) * mix2.to(tl.uint64, bitcast=True)
        z = z ^ (z >> 31)
        # The noise's top 24 bits order it as its floats do; the top set ranks above every noise value (2.0 there).
        score = tl.where(top, 1 << 24, (z >> 40).to(tl.int32))
        chosen = _take_ascending(score, valid, _kth_largest(score, valid, TOTAL, 25, SEARCH), TOTAL)
        tl.store(OUT + row * so + tl.cumsum(chosen.to(tl.int32), 0) - 1, offs.to(tl.int32), mask=chosen)


def _check_head_dim(q: torch.Tensor) -> int:
    D = q.shape[-1]
    if D < 16 or D & (D - 1) or q.stride(-1) != 1:
        raise ValueError(f"Chipmunk attention kernels need a power-of-two head dim >= 16, contiguous (got {D})")
    return D


def attention_column_sums(q: torch.Tensor, k: torch.Tensor, group: int, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Same as reference.attention_column_sums: (B, H, G, L_k) float32 softmax column sums per query group.
    `lse`: the rows' log-sum-exp of the scaled scores (natural log, (B, H, L)) when the dense attention already
    computed it (FA3 does); else a first pass over the keys computes it."""
    B, L, H, D = q.shape
    _check_head_dim(q)
    LK, G = k.shape[1], math.ceil(L / group)
    block_m = _row_tile(group, 64)
    scale_log2 = D ** -0.5 * LOG2E
    # The kernels work in the log2 domain.
    lse = (lse.float() * LOG2E).contiguous() if lse is not None else row_lse_log2(q, k, block_m)
    out = torch.empty(B, H, G, LK, device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(LK, meta["BLOCK_N"]), triton.cdiv(G, meta["GROUPS_PER_PROGRAM"]),  # noqa: E731
                         B * H)
    _column_sum_kernel[grid](q, k, lse, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                             k.stride(2), L, LK, H, G, scale_log2, D=D, GROUP=group, BLOCK_M=block_m)
    return out


def row_lse_log2(q: torch.Tensor, k: torch.Tensor, block_m: int = 64) -> torch.Tensor:
    """Each row's log-sum-exp of the scaled scores q k^T / sqrt(D), in log2 units: (B, H, L) float32."""
    B, L, H, D = q.shape
    _check_head_dim(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    _row_lse_kernel[(triton.cdiv(L, block_m), B * H)](
        q, k, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), L, k.shape[1], H,
        D ** -0.5 * LOG2E, D=D, BLOCK_M=block_m, BLOCK_N=16 if INTERPRET else 64, num_warps=4)
    return lse


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_index: torch.Tensor, group: int,
                     o_cache: torch.Tensor | None = None, dense_out: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Same as reference.sparse_attention_reference: A_S (+ o_cache), or dense_out - A_S (a dense step's new
    o_cache, in one pass: A_S is never written), (B, L, H, D) in q's dtype, into `out` when given (contiguous; it
    may be o_cache itself: each element is read before it is written, by the same program).
    One program per 64-row tile of a query group. (A per-group variant that shared each gathered K/V tile between
    128 + 64 row tiles at 8 warps was slower on the H100: 0.207 vs 0.155 ms at 16.5% keys.)"""
    B, L, H, D = q.shape
    _check_head_dim(q)
    if o_cache is not None and dense_out is not None:
        raise ValueError("sparse_attention: o_cache (a sparse step) or dense_out (a dense step), not both")
    G, NK = key_index.shape[2], key_index.shape[3]
    index = key_index.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"sparse_attention: out must be contiguous {tuple(q.shape)} {q.dtype}")
    base = o_cache if o_cache is not None else dense_out
    cache = base.contiguous() if base is not None else out  # unread when HAS_CACHE is False
    block_m = _row_tile(group, 64)
    _sparse_attention_kernel[(triton.cdiv(L, block_m), B * H)](
        q, k, v, index, cache, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), L, H, G, NK,
        D ** -0.5 * LOG2E, D=D, GROUP=group, BLOCK_M=block_m, HAS_CACHE=base is not None,
        SUBTRACT=dense_out is not None, EVEN_N=NK % 128 == 0)  # every autotune config's BLOCK_N divides 128
    return out


TOP_ASCENDING_MAX_ROW = 16384  # one row per program, held in registers (FLUX: 4608 keys, 12288 neurons)


def top_ascending(scores: torch.Tensor, count: int, search: str | None = None) -> torch.Tensor:
    """Same as reference.top_ascending (the `count` largest along the last dim, indices ascending, int32) in one
    launch, for rows of at most TOP_ASCENDING_MAX_ROW. `search`: one of SELECTION_SEARCHES (same result), or None for
    the autotuner's pick."""
    size = scores.shape[-1]
    if not 0 < count <= size or size > TOP_ASCENDING_MAX_ROW:
        raise ValueError(f"top_ascending: count {count} of {size} (rows of at most {TOP_ASCENDING_MAX_ROW})")
    _check_search(search)
    rows = scores.reshape(-1, size)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], count, device=scores.device, dtype=torch.int32)
    block = triton.next_power_of_2(size)
    _launch_selection(_top_ascending_kernel, (rows.shape[0],), search, rows, out, size, count, rows.stride(0),
                      out.stride(0), BLOCK=block)
    return out.view(*scores.shape[:-1], count)


def top_and_random(scores: torch.Tensor, top: int, total: int, seed: torch.Tensor | int,
                   search: str | None = None, reference: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Same as reference.top_and_random (the `top` largest along the last dim plus `total - top` random others,
    indices ascending, int32) in one launch. `seed`: an int, or an int64 device scalar (CUDA-graph replays).
    `search`: one of SELECTION_SEARCHES (same result), or None for the autotuner's pick. `reference` (float32, the
    shape of scores): rank |scores - reference| instead (scores in any float dtype, widened to float32 first).
    `out`: a contiguous int32 tensor (*scores.shape[:-1], total) to write the indices into."""
    size = scores.shape[-1]
    if not 0 < top <= total <= size or size > TOP_ASCENDING_MAX_ROW:
        raise ValueError(f"top_and_random: {top} + random of {total} of {size} (rows of at most "
                         f"{TOP_ASCENDING_MAX_ROW})")
    _check_search(search)
    rows = scores.reshape(-1, size)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if reference is not None:
        if reference.shape != scores.shape or reference.dtype != torch.float32:
            raise ValueError(f"top_and_random: reference must be float32 {tuple(scores.shape)}")
        ref_rows = reference.reshape(-1, size)
        ref_rows = ref_rows if ref_rows.stride(-1) == 1 else ref_rows.contiguous()
    shape = (*scores.shape[:-1], total)
    if out is None:
        out = torch.empty(shape, device=scores.device, dtype=torch.int32)
    elif out.shape != shape or out.dtype != torch.int32 or not out.is_contiguous():
        raise ValueError(f"top_and_random: out must be contiguous int32 {shape}")
    in_tensor = isinstance(seed, torch.Tensor)
    seed_mix, golden, mix1, mix2 = HASH_CONSTANTS
    block = triton.next_power_of_2(size)
    ref = ref_rows if reference is not None else rows  # unread without HAS_REF
    _launch_selection(
        _top_and_random_kernel, (rows.shape[0],), search, rows, ref, out, seed if in_tensor else rows,
        0 if in_tensor else hash_offset(seed), seed_mix, golden, mix1, mix2, size, top, total, rows.stride(0),
        ref.stride(0), total, SEED_IN_TENSOR=in_tensor, HAS_REF=reference is not None, BLOCK=block)
    return out


def _check_search(search: str | None) -> None:
    if search is not None and search not in SELECTION_SEARCHES:
        raise ValueError(f"selection search {search!r}: one of {SELECTION_SEARCHES}, or None")


def _launch_selection(kernel, grid: tuple, search: str | None, *args, BLOCK: int, **kwargs) -> None:
    """The autotuned kernel (search None), or its plain JIT function with the search and warps given."""
    if search is None:
        kernel[grid](*args, BLOCK=BLOCK, **kwargs)
    else:
        kernel.fn[grid](*args, BLOCK=BLOCK, SEARCH=search, num_warps=_selection_warps(BLOCK), num_stages=1,
                        **kwargs)


def _selection_warps(block: int) -> int:
    return 4 if INTERPRET else min(16, max(4, block // 1024))


def _largest(kernel, meta: str) -> int:
    """The largest tile any autotune config of the kernel gives `meta`: a size it divides suits every config."""
    return max(config.kwargs[meta] for config in kernel.configs)


def dense_mlp_epilogue(pre_t: torch.Tensor, b1: torch.Tensor, act_t: torch.Tensor, block: int) -> torch.Tensor:
    """A dense MLP step's fc1 epilogue in one pass over pre_t = W1 x^T (B, hidden, L), L contiguous: act_t (the same
    shape and layout: the neuron-major activation cache) = gelu_tanh(pre_t + b1), and the block means of the biased
    pre-activations, (B, nb, hidden) float32, as reference.block_means gives them. Where torch took three passes
    (the broadcast bias add, GELU, the block sums: ~245 us a layer on the H200)."""
    B, hidden, L = pre_t.shape
    if pre_t.stride(-1) != 1 or act_t.shape != pre_t.shape or act_t.stride(-1) != 1:
        raise ValueError("dense_mlp_epilogue needs pre_t and act_t of one shape, (B, hidden, L) with L contiguous")
    nb = math.ceil(L / block)
    means = torch.empty(B, nb, hidden, device=pre_t.device, dtype=torch.float32)
    block_h = 16 if INTERPRET else max(1, 8192 // triton.next_power_of_2(block))  # ~8k elements a program
    _dense_mlp_epilogue_kernel[(triton.cdiv(hidden, block_h), nb, B)](
        pre_t, b1.contiguous(), act_t, means, pre_t.stride(0), pre_t.stride(1), act_t.stride(0), act_t.stride(1), L,
        hidden, nb, block, BLOCK_H=block_h, BM=triton.next_power_of_2(block), num_warps=4 if INTERPRET else 8)
    return means


def sparse_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2_t: torch.Tensor, neuron_index: torch.Tensor,
               act_cache: torch.Tensor, out_cache: torch.Tensor, block: int,
               out: torch.Tensor | None = None, tma: bool | None = None, pre_mean: torch.Tensor | None = None,
               x_read: torch.cuda.Event | None = None, x_scale: torch.Tensor | None = None,
               w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """Same update as reference.sparse_mlp_reference, in place on act_cache and out_cache (float32).
    w2_t is fc2's weight transposed and contiguous, (hidden, out), so that selected neurons are rows. act_cache
    (B, L, hidden) may have any strides; neuron-major storage (reference.neuron_major) is the fast one. `out`, if
    given ((B, L, out), last dim contiguous, any float dtype), receives the updated out_cache rounded to its dtype
    by fc2's epilogue: the layer's output without another pass over the cache.
    `tma`: fc1's X and fc2's deltas through TMA descriptors (_sparse_fc1_tma_kernel, _sparse_fc2_tma_kernel), the
    same results; None (the layers' choice) uses them where `tma_by_default(x)` says they run, True insists on them,
    False keeps the pointer kernels (what the device benchmark compares them with).
    Returns the block means of the selected neurons' fc1 pre-activations, (B, nb, K) float32; or, given `pre_mean`
    ((B, nb, hidden) float32, last dim contiguous: the layer's reference pre-activations), writes them into their
    neurons' places there (what `pre_mean.scatter_(2, neuron_index, means)` does) and returns None.
    `x_read`: recorded on the current stream after fc1, the last kernel that reads x (a caller running this on a side
    stream lets the main stream reuse x's memory from there).
    `x_scale`, `w1_scale`: fc1 in float8: x and w1 float8 e4m3 (reference.float8_rows), x_scale (B, L) and w1_scale
    (hidden,) float32, their rows' scales; fc1 multiplies float8 tiles and scales its sums.
    `w2_scale`: fc2 in float8: w2_t float8 e4m3, the transpose of W2's float8 rows (reference.float8_rows of W2,
    (out, hidden)), w2_scale (out,) their scales; the deltas (in act_cache's dtype) are quantized per token
    (float8_rows) between the delta kernel and fc2 (the pointer kernel, whatever `tma` says), which scales its sums
    by token and by output column."""
    fp8 = x_scale is not None
    if fp8 != (w1_scale is not None) or fp8 != (x.dtype == w1.dtype == R.FLOAT8) or fp8 and (
            x_scale.shape != x.shape[:2] or w1_scale.shape != w1.shape[:1]):
        raise ValueError("sparse_mlp: float8 fc1 takes x and w1 in float8 e4m3 with x_scale (B, L) and w1_scale "
                         "(hidden,) (reference.float8_rows); bf16 fc1 takes neither")
    fc2_fp8 = w2_scale is not None
    if fc2_fp8 != (w2_t.dtype == R.FLOAT8) or fc2_fp8 and w2_scale.shape != w2_t.shape[1:]:
        raise ValueError("sparse_mlp: float8 fc2 takes w2_t in float8 e4m3 with w2_scale (out,); bf16 fc2 neither")
    if tma is None:
        tma = tma_by_default(x)
    B, L, DM = x.shape
    NB, NK = neuron_index.shape[1], neuron_index.shape[2]
    NOUT = w2_t.shape[1]
    if x.stride(-1) != 1 or out_cache.stride(-1) != 1 or out_cache.dtype != torch.float32:
        raise ValueError("sparse_mlp needs x (last dim contiguous) and a float32 out_cache")
    if out is not None and (out.shape != out_cache.shape or out.stride(-1) != 1):
        raise ValueError(f"sparse_mlp: out must be {tuple(out_cache.shape)} with its last dim contiguous")
    if pre_mean is not None and (pre_mean.shape != (B, NB, w1.shape[0]) or pre_mean.dtype != torch.float32
                                 or pre_mean.stride(-1) != 1):
        raise ValueError(f"sparse_mlp: pre_mean must be float32 {(B, NB, w1.shape[0])} with its last dim contiguous")
    if tma and B > 1 and x.stride(0) != L * x.stride(1):
        x = x.contiguous()  # the descriptor views x as (B * L, DM): each batch's rows must follow the previous one's
    if tma and ((x.stride(1) * x.element_size()) % 16 or x.data_ptr() % 16):
        raise ValueError(f"sparse_mlp(tma=True): TMA needs x's rows 16-byte aligned (row stride {x.stride(1)} "
                         f"elements of {x.element_size()} bytes)")
    w1, w2_t, b1 = w1.contiguous(), w2_t.contiguous(), b1.contiguous()
    index = neuron_index.to(torch.int32).contiguous()
    block_m = _row_tile(block, 128)
    new = torch.empty(B, L, NK, device=x.device, dtype=act_cache.dtype)
    # With TMA the deltas' rows are padded to 16 bytes (its stride alignment); the padding is never read (past the
    # descriptor's width). FLUX's neuron counts (multiples of 256) need none. float8 deltas: written in act_cache's
    # dtype, then quantized into a copy that the pointer fc2 reads.
    tma2 = tma and not fc2_fp8
    pad = 16 // w2_t.element_size() if tma2 else 1
    delta = torch.empty(B, L, -(-NK // pad) * pad, device=x.device,
                        dtype=act_cache.dtype if fc2_fp8 else w2_t.dtype)[:, :, :NK]
    pre_sum = torch.zeros(B, NB, NK, device=x.device, dtype=torch.float32)
    grid1 = lambda meta: (triton.cdiv(L, block_m), triton.cdiv(NK, meta["BLOCK_K"]), B)  # noqa: E731
    # Without float8 the scale pointers are never read (FP8 off): pre_sum stands in.
    scales = (x_scale.float().contiguous(), w1_scale.float().contiguous()) if fp8 else (pre_sum, pre_sum)
    if tma:
        fc1 = _sparse_fc1_tma_fp8_kernel if fp8 else _sparse_fc1_tma_kernel
        fc1[grid1](_row_view_descriptor(x, block_m), w1, b1, index, new, pre_sum, *scales, new.stride(0),
                   new.stride(1), L, DM, NK, NB, block, BLOCK_M=block_m, EVEN_D=DM % _largest(fc1, "BLOCK_D") == 0,
                   FP8=fp8)
    else:
        fc1 = _sparse_fc1_fp8_kernel if fp8 else _sparse_fc1_kernel
        fc1[grid1](x, w1, b1, index, new, pre_sum, *scales, x.stride(0), x.stride(1), new.stride(0), new.stride(1), L,
                   DM, NK, NB, block, BLOCK_M=block_m, EVEN_D=DM % _largest(fc1, "BLOCK_D") == 0, FP8=fp8)
    if x_read is not None:
        x_read.record()
    delta_k = 16 if INTERPRET else 64
    means_at = pre_mean if pre_mean is not None else pre_sum  # a pointer left untouched without WRITE_MEANS
    _activation_delta_kernel[(triton.cdiv(L, block_m), triton.cdiv(NK, delta_k), B)](
        new, index, act_cache, delta, pre_sum, means_at, new.stride(0), new.stride(1), act_cache.stride(0),
        act_cache.stride(1), act_cache.stride(2), delta.stride(0), delta.stride(1), means_at.stride(0),
        means_at.stride(1), L, NK, NB, block, BLOCK_M=block_m, BLOCK_K=delta_k, WRITE_MEANS=pre_mean is not None,
        num_warps=4)
    grid2 = lambda meta: (triton.cdiv(L, block_m), triton.cdiv(NOUT, meta["BLOCK_N"]), B)  # noqa: E731
    low = out if out is not None else out_cache  # a pointer the kernel never writes when WRITE_LOW is off
    scales2 = (pre_sum, pre_sum)  # never read with FP8 off
    if fc2_fp8:
        delta, delta_scale = float8_rows(delta)
        scales2 = (delta_scale.contiguous(), w2_scale.float().contiguous())
    if tma2:
        fc2 = _sparse_fc2_tma_kernel
        operands = (_row_view_descriptor(delta, block_m), w2_t, index, out_cache, low, *scales2)
    else:
        fc2 = _sparse_fc2_fp8_kernel if fc2_fp8 else _sparse_fc2_kernel
        operands = (delta, w2_t, index, out_cache, low, *scales2, delta.stride(0), delta.stride(1))  # with strides
    fc2[grid2](*operands, out_cache.stride(0), out_cache.stride(1), low.stride(0), low.stride(1), L, NK, NOUT, NB,
               block, WRITE_LOW=out is not None, BLOCK_M=block_m, EVEN_K=NK % _largest(fc2, "BLOCK_K") == 0,
               EVEN_N=NOUT % _largest(fc2, "BLOCK_N") == 0, FP8=fc2_fp8)
    if pre_mean is not None:
        return None
    return pre_sum / block_sizes(L, block, x.device)[None, :, None]


_compiled_float8_rows = None


def float8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.float8_rows, compiled on a GPU: one reduction and one quantizing pass, where eager PyTorch makes
    five passes and a float32 copy. Each shape and layout compiles at its first call (an eager step of the step
    graphs); on CPU tensors (the interpreter) the reference itself."""
    global _compiled_float8_rows
    if not t.is_cuda:
        return R.float8_rows(t)
    if _compiled_float8_rows is None:
        _compiled_float8_rows = torch.compile(R.float8_rows, fullgraph=True, dynamic=False)
    return _compiled_float8_rows(t)


def tma_by_default(x: torch.Tensor) -> bool:
    """Whether sparse_mlp uses its TMA kernels for x: on a Hopper or later GPU whose Triton has host-side TMA
    descriptors, for x whose rows are 16-byte aligned and whose batches follow each other (no copy needed). Not under
    the interpreter: the tests run both kernels there explicitly."""
    if INTERPRET or not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401 - Triton >= 3.3
    except ImportError:
        return False
    B, L, _ = x.shape
    return ((x.stride(1) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0
            and (B == 1 or x.stride(0) == L * x.stride(1)))


def _row_view_descriptor(t: torch.Tensor, block_rows: int):
    """A host-side TMA descriptor over t, (B, L, width) with B * L rows of stride t.stride(1) one after another, as a
    (B * L, width) matrix. The box is a placeholder until the kernel's config pre-hook sets it."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, L, width = t.shape
    return TensorDescriptor(t, [B * L, width], [t.stride(1), 1], [block_rows, 16])

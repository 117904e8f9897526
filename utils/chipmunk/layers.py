"""Chipmunk's sparse layers and the custom ops through which compiled blocks call them.

A layer is one attention or MLP with its caches. On a dense step it computes everything and caches its output; on a
sparse step it recomputes only the most important columns (attention keys, MLP neurons) and adds their change to
the cache. The decision is made in Python from the step index (StepClock), inside an op that torch.compile treats
as opaque, so a regionally compiled block is one graph with the layer as one of its inputs.

The layers are opaque objects (torch.library's custom classes): an op receives the layer itself, and dynamo passes it
as a graph input without guarding on which layer it is, so every block of a kind shares one compiled graph.

Caches are attributes of the layer that owns them, like gpt-fast's KVCache buffers: allocated on a generation's first
step at a new input shape, then written in place, never re-bound. A CUDA graph of a step (graphs.py) records their
addresses, so every graph reads and writes the same memory whichever step kind ran before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils.chipmunk import reference as R
from utils.chipmunk.config import AttnConfig, MlpConfig, attention_decision, mlp_decision, rounded_count
from utils.step_clock import StepClock

try:  # torch >= 2.14
    from torch._custom_class_base import CustomClassBase as _OpaqueBase
    from torch._library.opaque_object import register_custom_class as _register_custom_class

    def _opaque(cls):
        _register_custom_class(cls, typ="symbolic")
        return cls
except ImportError:  # torch 2.11 - 2.13
    from torch._library.opaque_object import register_opaque_type as _register_opaque_type
    from torch._opaque_base import OpaqueBase as _OpaqueBase

    def _opaque(cls):
        _register_opaque_type(cls, typ="reference")
        return cls


# --- kernels ---------------------------------------------------------------------------------------

def triton_kernels():
    """utils.chipmunk.kernels when it can run here (a CUDA device, or Triton's interpreter), else None."""
    try:
        from utils.chipmunk import kernels
    except Exception:  # noqa: BLE001 - reported by kernels_status()
        return None
    return kernels if kernels.TRITON_AVAILABLE else None


def kernels_status(kernels, device: torch.device) -> str:
    if kernels is not None:
        return "Triton kernels" + ("" if device.type == "cuda" else " (interpreted on CPU, slowly)")
    if device.type != "cuda":
        return "PyTorch reference (CPU)"
    try:
        from utils.chipmunk import kernels as k
    except Exception as e:  # noqa: BLE001
        return f"PyTorch reference (SLOW: utils.chipmunk.kernels failed to import: {type(e).__name__}: {e})"
    return f"PyTorch reference (SLOW: Triton unavailable: {k.UNAVAILABLE_REASON})"


def top_ascending(kernels, scores: torch.Tensor, count: int) -> torch.Tensor:
    """reference.top_ascending, in one kernel launch where the kernels take the row length."""
    if kernels is not None and scores.shape[-1] <= kernels.TOP_ASCENDING_MAX_ROW:
        return kernels.top_ascending(scores, count)
    return R.top_ascending(scores, count)


def top_and_random(kernels, scores: torch.Tensor, top: int, total: int, seed: torch.Tensor | int,
                   reference: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """reference.top_and_random, into `out` (an int32 buffer of the result's shape) if given; one launch with the
    kernels."""
    if kernels is not None and scores.shape[-1] <= kernels.TOP_ASCENDING_MAX_ROW:
        return kernels.top_and_random(scores, top, total, seed, reference=reference, out=out)
    index = R.top_and_random(scores, top, total, seed, reference=reference)
    return index if out is None else out.copy_(index)


def float8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b^T from float8 rows and their scales (reference.float8_rows): a (M, K) and b (N, K), row-major. On a
    GPU torch._scaled_mm with row-wise scales (as torchao's per-row float8 linears run); elsewhere, or for sizes it
    does not take (multiples of 16), the dequantized product in float32."""
    if a.is_cuda and all(n % 16 == 0 for n in (*a.shape, b.shape[0])):
        return torch._scaled_mm(a, b.t(), scale_a=a_scale[:, None].contiguous(), scale_b=b_scale[None, :].contiguous(),
                                out_dtype=out_dtype)
    return (R.dequantize_rows(a, a_scale) @ R.dequantize_rows(b, b_scale).t()).to(out_dtype)


def batched(per_item: list[torch.Tensor]) -> torch.Tensor:
    """The batch's results as one tensor, without torch.stack's copy for a batch of one (a dense step's fc1 output
    is 100 MB at FLUX.1-dev's shapes)."""
    return per_item[0].unsqueeze(0) if len(per_item) == 1 else torch.stack(per_item)


# --- what every sparse layer keeps -----------------------------------------------------------------

class SparseLayer(_OpaqueBase):
    """A sparse layer's bookkeeping: its own record of the last step it computed (a step index from the scheduler,
    never a call count), what its caches hold this generation (`flags`), and counts. `CACHES` names the cache
    attributes; they are dropped when the input shape changes and kept (their contents marked stale by `flags`)
    across generations of one shape."""

    CACHES: tuple[str, ...] = ()

    def __init__(self, name: str, index: int, clock: StepClock, kernels):
        self.name, self.index, self.clock, self.kernels = name, index, clock, kernels
        self.last_step: int | None = None
        self.shape: tuple | None = None
        self.flags: dict[str, bool] = {}
        self.stats = {"dense": 0, "sparse": 0, "reselect": 0}
        for cache in self.CACHES:
            setattr(self, cache, None)

    def begin(self, x: torch.Tensor) -> tuple[int, int | None]:
        """(step now, last step computed) for input x, after resetting on a new generation or a new shape."""
        step, shape = self.clock.step, (tuple(x.shape), x.dtype, x.device)
        if self.clock.at_first_step or shape != self.shape:
            if shape != self.shape:
                for cache in self.CACHES:
                    setattr(self, cache, None)
            self.last_step, self.flags, self.shape = None, {}, shape
        elif self.last_step is not None and step <= self.last_step:
            raise RuntimeError(f"Chipmunk {self.name}: called twice at step {step} (true CFG / batched "
                               f"conditioning runs are not supported with Chipmunk's per-step caches)")
        return step, self.last_step

    def write(self, cache: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Write `value` into the cache in place, converting to its dtype in the same pass. On first use the cache is
        a copy of `value` in `dtype` (default: value's): never `value` itself, which the caller may hand out."""
        dtype = dtype or value.dtype
        buffer = self.buffer(cache, value.shape, dtype)
        if buffer is None:
            setattr(self, cache, value.to(dtype, copy=True))
            return getattr(self, cache)
        return buffer.copy_(value)

    def buffer(self, cache: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """The cache if it exists with this shape and dtype (to be written in place), else None."""
        buffer = getattr(self, cache)
        return buffer if buffer is not None and buffer.shape == shape and buffer.dtype == dtype else None


# --- sparse attention ------------------------------------------------------------------------------

class DenseAttention:
    """The dense kernel for Chipmunk's dense steps (flux.dense_attention_like: bf16 FA3 wherever FA3 runs, else
    SDPA), shared by a transformer's attention layers: `(q, k, v) -> (output, the rows' log-sum-exp or None)`. bf16
    FA3 gives the log-sum-exp for free, which spares the column sums their first pass. The log-sum-exp is checked
    once, on the first dense step (eager, never inside a CUDA graph capture); if it is not what the column sums
    assume, they compute their own from then on."""

    def __init__(self, kernel, with_lse: bool):
        self.kernel, self.with_lse = kernel, with_lse
        self.lse_trusted: bool | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernels):
        if not self.with_lse:
            return self.kernel(q, k, v), None
        out, lse = self.kernel(q, k, v)
        if lse is None or kernels is None:
            return out, None
        if self.lse_trusted is None:
            self.lse_trusted = attention_lse_matches(q, k, lse, kernels)
            if not self.lse_trusted:
                print("[chipmunk] WARNING: the dense attention's log-sum-exp does not match the rows' log-sum-exp; "
                      "the column sums compute their own (one more pass over the keys per dense step)", flush=True)
        return out, lse if self.lse_trusted else None


def attention_lse_matches(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, kernels) -> bool:
    """Whether `lse` (as the dense attention kernel returned it) is the rows' natural-log log-sum-exp of the scaled
    scores, within float32-from-bf16 noise, against the Triton row pass. One host sync."""
    expected = kernels.row_lse_log2(q, k) / math.log2(math.e)
    return lse.shape == expected.shape and float((lse.float() - expected).abs().max()) < 1e-2


@_opaque
class SparseAttention(SparseLayer):
    """Joint attention with Chipmunk's sparse deltas. Caches: `key_index` (B, H, G, K) int32, each query group's key
    set; `o_cache` (B, L, H, D), O_dense - A_S of the last dense step. `mlp_beside`: a single block's MLP, which runs
    beside this attention from the same input; the attention waits, after its kernels, until the MLP has read it."""

    CACHES = ("key_index", "o_cache")

    def __init__(self, index: int, clock: StepClock, config: AttnConfig, dense: DenseAttention, kernels):
        super().__init__(f"attention layer {index}", index, clock, kernels)
        self.config, self.dense = config, dense
        self.mlp_beside: SparseMlp | None = None

    def decide(self, step: int, last: int | None) -> tuple[bool, bool]:
        """(dense step, selects its key set) at `step`, `last` being the last step it computed (None: the first of
        a generation, its caches stale)."""
        return attention_decision(step, last, self.config, self.flags.get("keys", False))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cfg, kernels = self.config, self.kernels
        step, last = self.begin(q)
        dense, select_keys = self.decide(step, last)
        if dense:
            out, lse = self.dense(q, k, v, kernels)
            if select_keys:
                count = rounded_count(cfg.top_keys, k.shape[1], cfg.counts_multiple_of)
                colsums = (kernels.attention_column_sums(q, k, cfg.mbm, lse) if kernels
                           else R.attention_column_sums(q, k, cfg.mbm))
                self.write("key_index", top_ascending(kernels, colsums, count))
                self.flags["keys"] = True
            # o_cache = O_dense - A_S in one pass (A_S never written), in place once the buffer exists; in the
            # output's dtype, like the output it corrects.
            self.o_cache = self._sparse(q, k, v, dense_out=out, into=self.buffer("o_cache", out.shape, out.dtype))
            self.stats["dense"] += 1
        else:
            out = self._sparse(q, k, v, o_cache=self.o_cache)
            self.stats["sparse"] += 1
        if self.mlp_beside is not None:
            self.mlp_beside.release_input()  # after the attention's kernels, which ran beside the MLP's fc1
        self.last_step = step
        return out

    def _sparse(self, q, k, v, o_cache=None, dense_out=None, into=None):
        if self.kernels:
            return self.kernels.sparse_attention(q, k, v, self.key_index, self.config.mbm, o_cache, dense_out,
                                                 out=into)
        result = R.sparse_attention_reference(q, k, v, self.key_index, self.config.mbm, o_cache, dense_out)
        return result if into is None else into.copy_(result)


# --- sparse MLP ------------------------------------------------------------------------------------

def selected_block_means(pre: torch.Tensor, length: int) -> torch.Tensor:
    """Block means of the selected neurons' pre-activations (B, nb, block, K), as reference.sparse_mlp_reference
    returns them, over the `length` real tokens (padded rows excluded): (B, nb, K)."""
    B, nb, block, K = pre.shape
    rows = torch.arange(nb * block, device=pre.device).view(nb, block) < length
    return (pre * rows[None, :, :, None]).sum(2) / rows.sum(1)[None, :, None]


@_opaque
class SparseMlp(SparseLayer):
    """fc1 -> GELU(tanh) -> fc2 with Chipmunk's per-token-block neuron deltas. `b2` may be None (single blocks, where
    linear2's bias is added once by the attention-output part). Caches: `act_cache` (B, L, hidden), stored
    neuron-major; `out_cache` (B, L, out) float32; `pre_mean` (B, nb, hidden) float32, the block means of the
    pre-activations the change is measured against; `neuron_index` (B, nb, K) int32, each token block's neurons.

    A double block calls it on its input (`__call__`). A single block's MLP reads the attention's input, so it runs
    beside the attention: `start(x)` before the attention's projections, on a side stream once its sparse kernels
    have run (and tuned) with nothing beside them; `join(like)` hands out its output after the attention.

    `config.is_fp8`: fc1 and fc2 in float8 e4m3, each operand with per-row scales (x, the activations and the
    activations' change per token, the weights per output row, as torchao's per-row float8): the sparse kernels
    gather float8 weight rows (W1's rows, W2^T's rows scaled by output column), a dense step runs
    torch._scaled_mm. The neuron reselection stays in the weights' dtype."""

    CACHES = ("act_cache", "out_cache", "pre_mean", "neuron_index")

    def __init__(self, index: int, clock: StepClock, config: MlpConfig, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor | None, kernels):
        super().__init__(f"MLP layer {index}", index, clock, kernels)
        self.config, self.w1, self.b1, self.w2, self.b2 = config, w1, b1, w2, b2
        self.w2_t: torch.Tensor | None = None  # (hidden, out) copy for the Triton kernel's row gathers
        self.float8: dict[str, torch.Tensor] | None = None  # is_fp8: w1, w2 in float8 and their row scales
        self.started: tuple[int, torch.Tensor] | None = None  # (step, output) of the step started ahead
        self.beside_attention = False  # a sparse attention runs beside it and waits for it to read their input
        self.input_read: torch.cuda.Event | None = None  # recorded on the side stream once it no longer reads x
        self.side_stream: torch.cuda.Stream | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        step, last = self.begin(x)
        return self._step(x, step, last)

    def start(self, x: torch.Tensor) -> None:
        """This step's MLP from x, the attention's input, started before the attention: on the side stream beside the
        attention's projections, the attention and its output projection, once a sparse step has run in place (its
        kernels tuned with nothing beside them), where a sparse attention waits for it (`beside_attention`). The output is allocated on the current stream (whose later work
        reads and frees it). Compiled code may reuse x's memory once the attention op returns, so that op ends with
        `release_input`: the current stream waits there until the side stream has read x (fc1)."""
        step, last = self.begin(x)
        output = x.new_empty(*x.shape[:-1], self.w2.shape[0])
        side = self._side(x.device) if self.beside_attention and self.stats["sparse"] > 0 else None
        if side is None:
            self._step(x, step, last, output)
        else:
            self.input_read = torch.cuda.Event()
            with torch.cuda.stream(side):
                self._step(x, step, last, output, self.input_read)
        self.started = (step, output)

    def release_input(self) -> None:
        """Called by the attention after its own kernels: the current stream waits until the MLP started ahead no
        longer reads the attention's input (a no-op when it ran in place)."""
        if self.input_read is not None:
            torch.cuda.current_stream().wait_event(self.input_read)
            self.input_read = None

    def join(self, like: torch.Tensor) -> torch.Tensor:
        """The output of the step started ahead: the current stream waits for the side stream first."""
        started, self.started = self.started, None
        if self.side_stream is not None and like.is_cuda:
            torch.cuda.current_stream(like.device).wait_stream(self.side_stream)
        if started is None or started[0] != self.clock.step or started[1].shape[:-1] != like.shape[:-1]:
            raise RuntimeError(f"Chipmunk {self.name}: its step starts in its block's forward, which did not run at "
                               f"step {self.clock.step} (a block's proj_out called on its own?)")
        return started[1]

    def _side(self, device: torch.device) -> torch.cuda.Stream | None:
        """The side stream, ready to follow the current stream's work so far (None on CPU: run in place)."""
        if device.type != "cuda":
            return None
        if self.side_stream is None or self.side_stream.device != device:
            self.side_stream = torch.cuda.Stream(device, priority=-1)  # first: its blocks take free SMs
        self.side_stream.wait_stream(torch.cuda.current_stream(device))
        return self.side_stream

    def decide(self, step: int, last: int | None) -> tuple[bool, bool]:
        """(dense step, reselects its neurons) at `step`, `last` being the last step it computed (None: the first of
        a generation, its caches stale)."""
        return mlp_decision(step, last, self.config, self.flags.get("neurons", False))

    def _step(self, x: torch.Tensor, step: int, last: int | None, output: torch.Tensor | None = None,
              x_read: torch.cuda.Event | None = None) -> torch.Tensor:
        """This step's MLP (dense, or sparse with a reselection when due) into `output` if given (else a new tensor);
        `x_read` is recorded on the current stream once no kernel reads x any more."""
        cfg, kernels = self.config, self.kernels
        dense, reselect = self.decide(step, last)
        if dense:
            act, pre_mean = self._dense_fc1(x)
            if x_read is not None:
                x_read.record()
            # The output is fc2's in x's dtype: the float32 cache holds the same values, so it is not read back.
            result = self._dense_fc2(act).to(x.dtype)
            output = result if output is None else output.copy_(result)
            self.write("out_cache", result, dtype=torch.float32)
            self.write("pre_mean", pre_mean)  # the reference the change is measured against
            self.flags["neurons"] = False  # a neuron set is chosen against the new reference
            self.stats["dense"] += 1
        else:
            if reselect:
                self._reselect(R.block_means(x, cfg.bm), step)
            fc1_in, w1, scales = x, self.w1, {}
            if cfg.is_fp8:
                f8 = self._float8()
                fc1_in, x_scale = self._float8_rows(x)
                w1, scales = f8["w1"], dict(x_scale=x_scale, w1_scale=f8["w1_scale"], w2_scale=f8["w2_scale"])
            if kernels:
                if self.w2_t is None or self.w2_t.device != x.device:
                    self.w2_t = self._float8()["w2"].t().contiguous() if cfg.is_fp8 else self.w2.t().contiguous()
                # A new tensor every call (never the cache itself: a compiled graph could reuse a handed-out
                # cache's buffer for later temporaries), written by fc2's epilogue.
                if output is None:
                    output = torch.empty(self.out_cache.shape, dtype=x.dtype, device=x.device)
                # The selected neurons' caches are fresh now: their next change is measured from the block means
                # of these pre-activations, which the kernels write into pre_mean.
                kernels.sparse_mlp(fc1_in, w1, self.b1, self.w2_t, self.neuron_index, self.act_cache,
                                   self.out_cache, cfg.bm, out=output, pre_mean=self.pre_mean, x_read=x_read, **scales)
            else:
                w2 = self.w2
                if cfg.is_fp8:  # the float8 operands' values, multiplied in float32
                    fc1_in, w1 = R.dequantize_rows(fc1_in, scales["x_scale"]), R.dequantize_rows(w1, scales["w1_scale"])
                    w2 = R.dequantize_rows(self._float8()["w2"], scales["w2_scale"])
                pre = R.sparse_mlp_reference(fc1_in, w1, self.b1, w2, self.neuron_index, self.act_cache,
                                             self.out_cache, cfg.bm, float8_deltas=cfg.is_fp8)
                if x_read is not None:
                    x_read.record()
                self.pre_mean.scatter_(2, self.neuron_index.long(), selected_block_means(pre, x.shape[1]))
                # Always a new tensor, even in the cache's dtype: handing out the cache itself would let a compiled
                # graph reuse its buffer for later temporaries (inductor's buffer reuse) and corrupt it.
                output = self.out_cache.to(x.dtype, copy=True) if output is None else output.copy_(self.out_cache)
            self.stats["sparse"] += 1
        self.last_step = step
        return output

    def _dense_fc1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A dense step's fc1 + GELU, computed transposed: (B, hidden, L) = W1 x^T is the activation cache's
        neuron-major storage itself (the layout the sparse kernels gather fast), so GELU writes the cache in one
        pass (computed token-major, the transposing copy into the cache took ~0.35 ms per layer on the H200). With
        the kernels, the bias, GELU and block means are one pass (`dense_mlp_epilogue`); torch's ops, the reference
        path, take three. Returns the cache (the token-major view, as `neuron_major` gives) and the block means of
        the pre-activations."""
        if self.config.is_fp8:
            f8, (xq, x_scale) = self._float8(), self._float8_rows(x)
            pre_t = batched([float8_matmul(f8["w1"], f8["w1_scale"], xq[b], x_scale[b], x.dtype)
                             for b in range(x.shape[0])])
        else:
            # B, hidden, L; cuBLAS reads x transposed. Detached: with a weight that requires grad (a Parameter,
            # even under no_grad) matmul folds 2-D @ 3-D into one mm and copies its transposed result.
            pre_t = torch.matmul(self.w1.detach(), x.transpose(1, 2))
        cache = self.act_cache
        if cache is None or cache.shape != pre_t.transpose(1, 2).shape or cache.dtype != pre_t.dtype:
            cache = self.act_cache = torch.empty_like(pre_t).transpose(1, 2)
        # Written in place from here on: a step graph holds the buffer's address.
        if self.kernels:
            return cache, self.kernels.dense_mlp_epilogue(pre_t, self.b1.detach(), cache.transpose(1, 2),
                                                          self.config.bm)
        pre_t += self.b1.detach()[:, None]  # (GELU's out= below takes no tensor that requires grad)
        torch.ops.aten.gelu.out(pre_t, approximate="tanh", out=cache.transpose(1, 2))
        return cache, R.block_means(pre_t.transpose(1, 2), self.config.bm)

    def _dense_fc2(self, act: torch.Tensor) -> torch.Tensor:
        """A dense step's fc2 of the activations (B, L, hidden), any strides (the neuron-major cache)."""
        if not self.config.is_fp8:
            return F.linear(act, self.w2, self.b2)
        f8, (aq, a_scale) = self._float8(), self._float8_rows(act)
        out = batched([float8_matmul(aq[b].contiguous(), a_scale[b], f8["w2"], f8["w2_scale"], act.dtype)
                       for b in range(act.shape[0])])
        return out if self.b2 is None else out + self.b2

    def _float8_rows(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """reference.float8_rows, by the kernels' compiled version where they run."""
        return (self.kernels.float8_rows if self.kernels else R.float8_rows)(t)

    def _float8(self) -> dict[str, torch.Tensor]:
        """w1 and w2 in float8 with their row scales (reference.float8_rows), made at first use on the weights'
        device."""
        if self.float8 is None or self.float8["w1"].device != self.w1.device:
            (w1, w1_scale), (w2, w2_scale) = R.float8_rows(self.w1.detach()), R.float8_rows(self.w2.detach())
            self.float8 = dict(w1=w1.contiguous(), w1_scale=w1_scale, w2=w2.contiguous(), w2_scale=w2_scale)
        return self.float8

    def _reselect(self, x_means: torch.Tensor, step: int) -> None:
        """Per token block: the top_keys neurons whose fc1 pre-activation block mean moved most since their
        cache was last refreshed, plus random_keys others. fc1 is linear, so the block mean of the
        pre-activation is fc1 of the block mean of x (`x_means`, block_means(x)): one small matmul instead of a
        dense fc1."""
        cfg, hidden = self.config, self.w1.shape[0]
        now = F.linear(x_means.to(self.w1.dtype), self.w1, self.b1)  # B, nb, hidden
        total = rounded_count(cfg.top_keys + cfg.random_keys, hidden, cfg.counts_multiple_of)
        top = min(total, int(round(cfg.top_keys * hidden)))
        # Deterministic per (layer, step), so runs that compute the same steps draw the same random neurons, on any
        # device, eager or replayed from a CUDA graph (where the step is a device tensor the replays update).
        step_value = self.clock.step_tensor if self.clock.step_tensor is not None else step
        # Ranked by |now - pre_mean| (in float32) and written into the index buffer, in the selection's one launch.
        into = self.buffer("neuron_index", (*now.shape[:-1], total), torch.int32)
        self.neuron_index = top_and_random(self.kernels, now, top, total, 1_000_003 * (self.index + 1) + step_value,
                                           reference=self.pre_mean, out=into)
        self.flags["neurons"] = True
        self.stats["reselect"] += 1


# --- the ops compiled blocks call -------------------------------------------------------------------

@torch.library.custom_op("flux_harness::chipmunk_attention", mutates_args=())
def chipmunk_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: SparseAttention,
                          block_input: torch.Tensor | None = None) -> torch.Tensor:
    """Opaque to torch.compile: the per-step dense/sparse decision and the caches stay in Python. Contiguous, as
    the fake says: compiled code after the op is traced for those strides (the reference path's are not).
    `block_input`: a single block's normalised input, which its MLP reads beside the attention (an input of the op,
    so compiled code keeps it alive until the op has waited for the MLP's reads)."""
    return layer(q, k, v).contiguous()


@chipmunk_attention_op.register_fake
def _(q, k, v, layer, block_input=None):
    return torch.empty_like(q)


@torch.library.custom_op("flux_harness::chipmunk_mlp", mutates_args=())
def chipmunk_mlp_op(x: torch.Tensor, layer: SparseMlp, out_features: int) -> torch.Tensor:
    """A double block's image MLP, this step (opaque to torch.compile, like chipmunk_attention_op)."""
    return layer(x)


@chipmunk_mlp_op.register_fake
def _(x, layer, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("flux_harness::chipmunk_mlp_start", mutates_args=("x",))
def chipmunk_mlp_start_op(x: torch.Tensor, layer: SparseMlp) -> None:
    """Starts a single block's MLP step from its normalised input x, before the attention's projections. x is
    declared mutated (it is only read) so that compiled code, whose scheduler would otherwise move this op down to
    the attention op, keeps it ahead of every later reader of x: the QKV projection first."""
    layer.start(x)


@torch.library.custom_op("flux_harness::chipmunk_mlp_join", mutates_args=())
def chipmunk_mlp_join_op(like: torch.Tensor, layer: SparseMlp, out_features: int) -> torch.Tensor:
    """The output of the single block's MLP step started ahead (`like`: a tensor of the block's rows, whose shape
    the output shares but for the last dim)."""
    return layer.join(like)


@chipmunk_mlp_join_op.register_fake
def _(like, layer, out_features):
    return like.new_empty(*like.shape[:-1], out_features)

"""Feature caching for diffusers' FluxTransformer2DModel and QwenImageTransformer2DModel: FORA reuse, TaylorSeer,
HiCache, FBCache(+Taylor), cache-dit.

Qwen-Image's blocks are all double-stream, with FLUX's double block's structure as far as the cache is concerned:
two gated image-stream sub-modules (`attn`, first output, and `img_mlp`), gates from a SiLU + Linear modulation of
`temb`; so the same slots, forecasts and one-sum forecast step apply (2 slots per block, 120 on Qwen-Image).

Formulas and schedules: docs/ALGORITHMS.md. How it attaches, without forking the model:

* The two block lists (`transformer_blocks`, `single_transformer_blocks`) become `_CachedBlockList`s: the same
  ModuleList (same children, same state_dict keys, `compile_repeated_blocks` still finds and compiles the
  original blocks) whose iteration yields a thin proxy per block. The transformer's own forward loops over
  them, so every block call passes through `HarnessCache.run_block`, which decides in Python.
* Forward hooks on the sub-modules `attn`, `ff` (double blocks) and `proj_out` (single blocks) keep their
  pre-gate outputs on full steps. The hooks run inside the (regionally compiled, possibly Chipmunk-modified)
  block: its tensors come out as extra graph outputs, no graph break.
* A forward pre-hook / hook pair on the transformer resets state at the first step of each generation
  (StepClock), decides the step type, and counts FLOPs with FlopCounterMode once per step type and shape.

Choice (docs/DESIGN.md): only the IMAGE stream is cached and forecast. On a forecast step no attention
runs, so text tokens cannot reach image tokens, and the transformer returns only image tokens; the text-stream
forecasts of the reference (txt_attn, txt_mlp, the text rows of single blocks) cannot change the output, so
they are not stored (saves ~11% cache memory) and not computed (saves the `norm1_context` modulations).
The image output is bitwise the same as forecasting both streams.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from utils.errors import StackError
from utils.forecast_window import accumulation_dtype, window_contributions
from utils.peer_caches import StepProbe, apply_peer_cache, is_peer_mode
from utils.step_clock import StepClock

SCHEDULED_MODES = ("fora", "taylor", "hicache")  # fixed interval schedule, per-block features
ALL_MODES = ("none", *SCHEDULED_MODES, "fbcache")  # the modes HarnessCache runs (cache_dit is cache-dit's own)


# --- validation ------------------------------------------------------------------------------------

def validate_cache_args(args: argparse.Namespace) -> None:
    """Refuse bad caching flags before any work is done, naming the fix."""
    if args.interval < 1:
        raise StackError(f"--interval must be >= 1 (1 = every step full); got {args.interval}")
    if args.max_order < 0:
        raise StackError(f"--max_order must be >= 0 (0 = reuse); got {args.max_order}")
    if args.first_enhance < 0:
        raise StackError(f"--first_enhance must be >= 0; got {args.first_enhance}")
    if not args.hicache_scale > 0:  # also catches NaN
        raise StackError(f"--hicache_scale must be > 0 (published: 0.6); got {args.hicache_scale}")
    if not args.fbcache_threshold >= 0:
        raise StackError(f"--fbcache_threshold must be >= 0 (0 = never skip; FLUX: 0.08); got {args.fbcache_threshold}")
    if is_peer_mode(args.cache_mode):
        return  # utils/peer_caches.py checks its own (validate_peer_cache_args)
    if args.cache_mode == "cache_dit":
        if not args.cache_dit_config:
            raise StackError("--cache_mode cache_dit needs --cache_dit_config PATH (see configs/cache_dit.yaml)")
        if not Path(args.cache_dit_config).is_file():
            raise StackError(f"--cache_dit_config {args.cache_dit_config!r} does not exist; pass a YAML file such as "
                             f"configs/cache_dit.yaml")
        try:
            import cache_dit  # noqa: F401
        except ImportError as e:
            raise StackError(f"--cache_mode cache_dit needs the cache-dit package: pip install cache-dit==1.5.3 "
                             f"(or pick another --cache_mode) [{e}]") from None


# --- the math (pure functions, tested against an fp64 oracle) ---------------------------------------

def is_full_step(step: int, last_full: int | None, interval: int, first_enhance: int) -> bool:
    """Steps 0..fe-1 are full, then one every `interval` steps counted from the last full step.

    With fe >= 1 this is exactly 0..fe-1, fe-1+N, fe-1+2N, ... (ALGORITHMS.md 1); `last_full is None` only
    guards fe = 0 (nothing cached yet). interval=1 makes every step full with no special case."""
    return step < first_enhance or last_full is None or step - last_full >= interval


def hermite(n: int, y: float) -> float:
    """Physicists' Hermite polynomial H_n(y): H0=1, H1=2y, H_{n+1} = 2y H_n - 2n H_{n-1}."""
    h_prev, h = 1.0, 2.0 * y
    if n == 0:
        return h_prev
    for k in range(1, n):
        h_prev, h = h, 2.0 * y * h - 2.0 * k * h_prev
    return h


def forecast_coefficients(mode: str, x: float, num_orders: int, hicache_scale: float) -> list[float]:
    """c_k such that the forecast is F = sum_k c_k D_k, x steps after the last full step.

    fora: F = D0. taylor: c_k = x^k / k!. hicache: c_0 = 1, c_k = H_k(sigma x) sigma^k / k! (dual scaling)."""
    if mode == "fora":
        return [1.0]
    if mode == "taylor":
        return [x ** k / math.factorial(k) for k in range(num_orders)]
    if mode == "hicache":
        s = hicache_scale
        return [1.0] + [hermite(k, s * x) * s ** k / math.factorial(k) for k in range(1, num_orders)]
    raise ValueError(f"no forecast for mode {mode!r}")


def update_differences(previous: list[torch.Tensor] | None, feature: torch.Tensor, distance: int | torch.Tensor,
                       max_order: int) -> list[torch.Tensor]:
    """Finite differences over full steps: D0 = F, D_{i+1} = (D_i - D_i_prev) / d where D_i_prev exists."""
    orders = [feature]
    if previous is not None:
        for i in range(min(max_order, len(previous))):
            orders.append((orders[i] - previous[i]) / distance)
    return orders


def difference_weights(previous: list[list[float]] | None, position: int, distance: float, count: int,
                       size: int) -> list[list[float]]:
    """update_differences on weights: the cache holds the features of its last `size` full steps (a ring of buffers)
    and each order D_k is a weighted sum of them, D_k = sum_b w[k][b] F_b. A full step writing its features into
    buffer `position` leaves D0 = F_position and D_{i+1} = (D_i - D_i_old) / d for i < count - 1, from the previous
    weights (count - 1 old orders must exist). Host arithmetic in float64: the differences cost no pass over the
    cache."""
    orders = [[1.0 if b == position else 0.0 for b in range(size)]]
    for i in range(count - 1):
        orders.append([(new - old) / distance for new, old in zip(orders[i], previous[i])])
    return orders


def forecast_weights(mode: str, x: float, orders: list[list[float]], hicache_scale: float) -> list[float]:
    """The forecast sum_k c_k D_k as weights of the cached features: sum_k c_k w[k][b] for each buffer b."""
    coefficients = forecast_coefficients(mode, x, len(orders), hicache_scale)
    return [sum(c * order[b] for c, order in zip(coefficients, orders)) for b in range(len(orders[0]))]


def predict(orders: list[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """sum_k c_k D_k; c_0 is 1 for every mode, so D0 is added as is."""
    out = orders[0]
    for k in range(1, len(orders)):
        out = out + coefficients[k] * orders[k]
    return out


def combine(features: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_b w_b F_b in (at least) float32: the weights of a higher-order forecast have mixed signs (differences),
    so the terms are summed before one rounding."""
    accumulate = torch.promote_types(features[0].dtype, torch.float32)
    out = features[0].to(accumulate, copy=True).mul_(weights[0])  # in place: one float32 temporary when eager
    for b in range(1, len(features)):
        out.addcmul_(features[b], weights[b])
    return out


def forecast_image_stream(hidden_states: torch.Tensor, temb: torch.Tensor, weights: torch.Tensor,
                          gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                          features: list[torch.Tensor]) -> torch.Tensor:
    """A whole forecast step's block stack, image rows only. On a forecast step no attention runs and every block
    only adds `gate * forecast` to the image stream, so the stack collapses to one sum over the cached slots:

        img + sum_s gate_s(temb) * sum_k c_k D_k[s]  =  img + sum_s gate_s(temb) * sum_b w_b F_b[s]

    (the forecast as weights of the cached features, forecast_weights). gates: every block's modulation, gate rows
    only, as one GEMV (`gate_weight` stacks those rows). The sum is accumulated in (at least) float32 (the blocks add
    one bf16 rounding per slot; this rounds once). Compiled, it is one GEMV and one reduction kernel that reads each
    cached tensor once, with a handful of inputs: per-feature tensors and per-block modules made the step CPU-bound
    on the H100 (12.8 ms per step)."""
    num_slots, batch = features[0].shape[0], temb.shape[0]
    gates = nn.functional.linear(nn.functional.silu(temb), gate_weight, gate_bias)  # [B, S * D]
    gates = gates.view(batch, num_slots, 1, -1).transpose(0, 1)  # [S, B, 1, D]
    accumulate = torch.promote_types(hidden_states.dtype, torch.float32)
    contribution = (gates * combine(features, weights)).sum(0, dtype=accumulate)
    return (hidden_states.to(accumulate) + contribution).to(hidden_states.dtype)


def flux_temb(transformer: nn.Module, t: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """FluxTransformer2DModel's temb at the step of scheduler timestep `t`, computed as its forward computes it, from
    this call's other arguments: the FLUX pipelines (Kontext's too) pass `t.expand(B).to(latents.dtype) / 1000`, and
    the forward scales timestep and guidance by 1000 in that dtype. tests/test_caching.py checks it against every
    step's temb, bit for bit."""
    hidden = kwargs["hidden_states"]
    timestep = (t.expand(hidden.shape[0]).to(hidden.dtype) / 1000).to(hidden.dtype) * 1000
    guidance, pooled = kwargs.get("guidance"), kwargs["pooled_projections"]
    if guidance is None:
        return transformer.time_text_embed(timestep, pooled)
    return transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)


# --- capture hooks ---------------------------------------------------------------------------------

def _keep_output(module: nn.Module, args: Any, output: Any) -> None:
    # One module-level function for every hook: inside a compiled block it is traced, and the same function
    # everywhere keeps one compiled graph per block class.
    module.harness_feature = output


def _take(module: nn.Module) -> Any:
    out = module.__dict__.pop("harness_feature")
    return out


# --- the state and the per-block logic ------------------------------------------------------------

class HarnessCache:
    """All caching state of one transformer; `transformer.harness_cache`. Switch `mode` (and the parameters)
    between generations to compare modes on one compiled pipeline."""

    def __init__(self, transformer: nn.Module, scheduler, mode: str, interval: int = 5, max_order: int = 2,
                 first_enhance: int = 3, hicache_scale: float = 0.6, fbcache_threshold: float = 0.08,
                 fbcache_taylor: bool = False, forecast_window: bool = False):
        self.transformer = transformer
        self.clock = StepClock(scheduler)
        self.mode, self.interval, self.max_order, self.first_enhance = mode, interval, max_order, first_enhance
        self.hicache_scale, self.fbcache_threshold, self.fbcache_taylor = hicache_scale, fbcache_threshold, fbcache_taylor
        self.forecast_window = forecast_window
        self.qwen = type(transformer).__name__ == "QwenImageTransformer2DModel"
        self.double_blocks = list(transformer.transformer_blocks)
        self.single_blocks = [] if self.qwen else list(transformer.single_transformer_blocks)
        self.num_blocks = len(self.double_blocks) + len(self.single_blocks)
        if self.qwen:
            # Qwen-Image's double-stream block: img_mod = SiLU + Linear(dim, 6 dim) whose chunks are shift, scale,
            # gate (attention), shift, scale, gate (MLP), each gate multiplying the image stream's attention output
            # (`attn`'s first output) and MLP output (`img_mlp`) before the residual add, as in FLUX's double block.
            self.mlps = [b.img_mlp for b in self.double_blocks]
            self.modulations = [b.img_mod[1] for b in self.double_blocks]
        else:
            self.mlps = [b.ff for b in self.double_blocks]
            self.norms = [b.norm1 for b in self.double_blocks] + [b.norm for b in self.single_blocks]
            self.modulations = [n.linear for n in self.norms]
        # AdaLayerNormZero chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp;
        # AdaLayerNormZeroSingle: shift, scale, gate.
        self.gate_slots = [(6, (2, 5))] * len(self.double_blocks) + [(3, (2,))] * len(self.single_blocks)
        self.hooks = []
        for block, mlp in zip(self.double_blocks, self.mlps):
            self.hooks += [block.attn.register_forward_hook(_keep_output), mlp.register_forward_hook(_keep_output)]
        for block in self.single_blocks:
            self.hooks.append(block.proj_out.register_forward_hook(_keep_output))
        self.forecast_backend: str | None = None  # set on first use: None = eager
        # Persistent buffers (self.buffer), written in place: a CUDA graph of a step holds the addresses it read and
        # wrote, so none is re-bound while the transformer's input shape stays (a new one drops the graphs too):
        #   features b        the image-stream features of one full step, [slot, batch, image tokens, dim], a ring of
        #                     `ring_size`: a full step overwrites the oldest (self.features, the valid ones first);
        #   weights n         a forecast's weights of the first n features, filled before the step;
        #   window_*          the forecast window's (utils/forecast_window.py): temb and the weights at each of the
        #                     window's distances, filled before its first step, and every step's contribution,
        #                     written by that step and read by the later ones.
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.input_shape: tuple | None = None
        self.features: list[torch.Tensor] = []
        self.weights: torch.Tensor | None = None
        self._gates: tuple[torch.Tensor, torch.Tensor] | None = None  # gate rows of every modulation, stacked
        self.window_temb: torch.Tensor | None = None
        self.window_weights: torch.Tensor | None = None
        self.contributions: torch.Tensor | None = None
        self._compiled: dict[str, Any] = {}
        self.flops: dict[tuple, int] = {}
        self._counting = None
        self.reset()

    # -- per generation --
    def reset(self) -> None:
        self.num_orders = 0  # this generation's differences; as many features, in buffers 0 .. num_orders - 1
        self.update_count = 0  # on a full step: how many orders it leaves (1: D0 only)
        self.order_weights: list[list[float]] = []  # D_k = sum_b order_weights[k][b] * features[b]
        self.new_order_weights: list[list[float]] = []  # the coming full step's
        self.position = self.next_position = 0  # the feature buffer the coming (the next) full step writes
        self.pending: list[list[torch.Tensor] | None] = [None] * self.num_blocks  # this full step's captures
        self.last_full: int | None = None
        self.full_steps = self.forecast_steps = self.windows = 0
        self.step_kinds: list[str] = []
        self.cache_memory_bytes = 0
        self.last_step: int | None = None
        # fbcache
        self.first_residual_ref: torch.Tensor | None = None
        self.residual: list[torch.Tensor] | None = None  # orders of R = h_final - h_after_block0 (image rows)
        self.after_first_block: torch.Tensor | None = None

    def begin_step(self, kwargs: dict[str, Any] | None = None) -> None:
        """Called before each transformer call (with its keyword arguments): reset on a new generation, then decide
        full or forecast."""
        if self.clock.at_first_step:
            self.generation_index = getattr(self, "generation_index", -1) + 1
            self.reset()
        step = self.clock.step
        if step == self.last_step:
            raise RuntimeError("feature caching saw two transformer calls for one denoising step (true CFG?): "
                               "not supported; use --disable_cache")
        self.last_step = step
        self.distance = step - self.last_full if self.last_full is not None else 1
        hidden = (kwargs or {}).get("hidden_states")
        shape = None if hidden is None else (tuple(hidden.shape), hidden.dtype, hidden.device)
        if shape != self.input_shape:  # the step graphs are dropped as well: no graph holds the old buffers
            self.input_shape, self.buffers, self.features = shape, {}, []
        if self.mode in SCHEDULED_MODES:
            self.full = is_full_step(step, self.last_full, self.interval, self.first_enhance)
            self._prepare_scheduled_step(step, kwargs)
        else:
            self.full = True  # none: always; fbcache: decided after block 0
        self.skip_rest = False

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The persistent buffer of that name and shape (allocated on first use, uninitialized)."""
        key = (name, tuple(shape), dtype, device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self.buffers[key]

    @property
    def ring_size(self) -> int:
        return 1 if self.mode == "fora" else self.max_order + 1

    def uses_window(self) -> bool:
        """The window forecast applies: --forecast_window, a scheduled mode on FLUX (whose temb this cache computes
        ahead, see flux_temb), at most three orders (the kernel's)."""
        return self.forecast_window and self.mode in SCHEDULED_MODES and not self.qwen and self.ring_size <= 3

    @property
    def window_size(self) -> int:
        return max(self.interval - 1, 1)  # the forecasts between two full steps: distances 1 .. interval - 1

    def _prepare_scheduled_step(self, step: int, kwargs: dict[str, Any] | None = None) -> None:
        """What this step does to the cache, and its inputs written into the persistent buffers, before the forward
        runs: so that the forward itself takes no decision a CUDA graph of it could not replay."""
        if self.full:
            max_order = 0 if self.mode == "fora" else self.max_order
            # Reference quirk kept: differences only once step > fe - 2, so with fe=3 the first one uses d=1.
            reset = self.num_orders == 0 or max_order == 0 or step <= self.first_enhance - 2
            self.update_count = 1 if reset else 1 + min(max_order, self.num_orders)
            # A reset starts the ring over, so the valid features are always buffers 0 .. num_orders - 1: the
            # orders grow by one a full step from a reset, as the position does, until they fill the ring.
            self.position = 0 if reset else self.next_position
            self.new_order_weights = difference_weights(self.order_weights, self.position, float(self.distance),
                                                        self.update_count, self.ring_size)
        elif self.uses_window():
            if self.distance == 1:
                self._prepare_window(step, kwargs)
        else:
            device, n = self.transformer.device, self.num_orders
            self.weights = self.buffer(f"weights {n}", (n,), torch.float32, device)
            weights = forecast_weights(self.mode, step - self.last_full, self.order_weights, self.hicache_scale)
            for b, w in enumerate(weights[:n]):  # kernels with the value as an argument: no host sync, no race
                self.weights[b].fill_(w)

    def _prepare_window(self, step: int, kwargs: dict[str, Any] | None) -> None:
        """Before a window's first forecast: temb at each of its steps (a step past the schedule's end repeats the
        last; its contribution is never read) and the weights at each distance, into the persistent buffers."""
        if kwargs is None:
            raise RuntimeError("the forecast window needs the transformer call's arguments (begin_step(kwargs))")
        timesteps, size, n = self.clock.scheduler.timesteps, self.window_size, self.num_orders
        rows = [flux_temb(self.transformer, timesteps[min(step + j, len(timesteps) - 1)], kwargs) for j in range(size)]
        self.window_temb = self.buffer("window temb", (size, *rows[0].shape), rows[0].dtype, rows[0].device)
        torch.stack(rows, out=self.window_temb)
        self.window_weights = self.buffer(f"window weights {n}", (size, n), torch.float32, self.window_temb.device)
        for j in range(size):
            weights = forecast_weights(self.mode, j + 1, self.order_weights, self.hicache_scale)
            for b, w in enumerate(weights[:n]):
                self.window_weights[j, b].fill_(w)

    def step_kind(self) -> tuple:
        """What the coming step computes, besides its inputs and the persistent buffers (for CUDA graphs of it):
        a full step and the feature buffer it writes, or a forecast and how many features it reads (and in a window,
        at which distance of how long a window)."""
        if self.full:
            return ("full", self.position)
        if self.uses_window():  # the window's first step writes the contributions, each later one reads its own
            return ("forecast", self.num_orders, self.distance, self.window_size)
        return ("forecast", self.num_orders)

    def flop_kind(self) -> str:
        """The step types whose FLOPs differ: full, forecast, and a window's first forecast (the window's pass)."""
        if self.full:
            return "full"
        return "forecast_window" if self.uses_window() and self.distance == 1 else "forecast"

    def end_step(self) -> None:
        kind = "full" if self.full else "forecast"
        self.step_kinds.append(kind)
        if self.full:
            self.full_steps += 1
            self.last_full = self.clock.step
            if self.mode in SCHEDULED_MODES:
                self.num_orders, self.order_weights = self.update_count, self.new_order_weights
                self.next_position = (self.position + 1) % self.ring_size
        else:
            self.forecast_steps += 1
            self.windows += self.flop_kind() == "forecast_window"
        self.cache_memory_bytes = max(self.cache_memory_bytes, self._cache_bytes())

    def _cache_bytes(self) -> int:
        storages = {}
        valid = self.features[:self.num_orders]
        tensors = valid + (list(self._gates) if self._gates and valid else [])
        tensors += [self.contributions] if self.contributions is not None and valid else []
        tensors += (self.residual or []) + [t for t in (self.first_residual_ref, self.after_first_block) if t is not None]
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    # -- the block proxies call this --
    def run_block(self, index: int, block: nn.Module, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_rest:  # forecast step (or FBCache skip): the image stream is already final
            return kwargs["encoder_hidden_states"], kwargs["hidden_states"]
        if self.mode in SCHEDULED_MODES and not self.full:
            self.skip_rest = True
            return kwargs["encoder_hidden_states"], self._forecast(kwargs["hidden_states"], kwargs["temb"])
        text_len = kwargs["encoder_hidden_states"].shape[1]
        hidden_in = kwargs["hidden_states"]
        txt, img = block(**kwargs)
        captured = self._captured(index, block, text_len)
        if self.mode in SCHEDULED_MODES:
            self.pending[index] = captured
            if index == self.num_blocks - 1:
                self._update_all_features()
        elif self.mode == "fbcache":
            img = self._fbcache(index, hidden_in, img)
        return txt, img

    def _captured(self, index: int, block: nn.Module, text_len: int) -> list[torch.Tensor]:
        if index < len(self.double_blocks):
            return [_take(block.attn)[0], _take(self.mlps[index])]
        return [_take(block.proj_out)[:, text_len:]]  # the image rows of concat(txt, img)

    def _update_all_features(self) -> None:
        """After the last block of a full step: its features, stacked over the slots, into their ring buffer. The
        differences are weights (difference_weights), so this is the full step's only pass over the cache: one read
        and one write of the features (3.8 GB on FLUX.1-dev at 1024x1024), where computing the differences on the
        device read and wrote every order."""
        captured, self.pending = [f for block in self.pending for f in block], [None] * self.num_blocks
        shape = (len(captured), *captured[0].shape)
        self.features = [self.buffer(f"features {b}", shape, captured[0].dtype, captured[0].device)
                         for b in range(self.ring_size)]
        torch.stack(captured, out=self.features[self.position])

    def _coefficients(self, mode: str, num_orders: int, like: torch.Tensor) -> torch.Tensor:
        x = self.clock.step - self.last_full
        coeffs = forecast_coefficients(mode, x, num_orders, self.hicache_scale)
        return torch.tensor(coeffs, dtype=torch.float32).to(like.device, non_blocking=True)

    def _forecast(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.uses_window():
            return self._forecast_from_window(hidden_states)
        forecast = self._maybe_compiled("forecast", forecast_image_stream)
        return forecast(hidden_states, temb, self.weights, *self._gate_rows(temb.dtype),
                        self.features[:self.num_orders])

    def _forecast_from_window(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """img + this step's contribution; the window's first step first computes every step's (one pass over the
        cache: the gates at all of the window's steps as one GEMM, then the kernel)."""
        if self.distance == 1:
            gate_weight, gate_bias = self._gate_rows(self.window_temb.dtype)
            gates = nn.functional.linear(nn.functional.silu(self.window_temb), gate_weight, gate_bias)  # [W, B, S*D]
            gates = gates.view(*gates.shape[:2], self.features[0].shape[0], -1)  # [W, B, S, D]
            shape = (self.window_size, *self.features[0].shape[1:])
            self.contributions = self.buffer("window contributions", shape, accumulation_dtype(self.features[0].dtype),
                                             hidden_states.device)
            window_contributions(self.features[:self.num_orders], self.window_weights, gates, out=self.contributions)
        accumulate = torch.promote_types(hidden_states.dtype, torch.float32)
        return (hidden_states.to(accumulate) + self.contributions[self.distance - 1]).to(hidden_states.dtype)

    def _gate_rows(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate rows of every block's modulation linear, in slot order, as one weight and bias (built on first
        use, after any float8 quantization: torchao weights are dequantized; the GEMV is memory-bound either
        way). Costs num_slots * dim^2 elements (FLUX.1-dev: 1.4 GB bf16, counted in the cache memory)."""
        if self._gates is None or self._gates[0].dtype != dtype:
            weights, biases = [], []
            for linear, (num_chunks, gate_ids) in zip(self.modulations, self.gate_slots):
                weight, bias = linear.weight.detach(), linear.bias.detach()
                weight = weight.dequantize() if type(weight) is not torch.Tensor else weight  # torchao subclass
                rows = weight.shape[0] // num_chunks
                weights += [weight[g * rows:(g + 1) * rows] for g in gate_ids]
                biases += [bias[g * rows:(g + 1) * rows] for g in gate_ids]
            self._gates = torch.cat(weights).to(dtype), torch.cat(biases).to(dtype)
        return self._gates

    def _fbcache(self, index: int, hidden_in: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """First-block residual criterion (ALGORITHMS.md 2), image stream."""
        if index == 0:
            first_residual = img - hidden_in
            if self.residual is not None and self.first_residual_ref is not None:
                ref = self.first_residual_ref.float()
                change = (first_residual.float() - ref).abs().mean() / ref.abs().mean()
                if change.item() < self.fbcache_threshold:  # the one data-dependent decision (a sync)
                    self.full, self.skip_rest = False, True
                    mode = "taylor" if self.fbcache_taylor else "fora"
                    coeffs = self._coefficients(mode, len(self.residual), img)
                    return img + predict(self.residual, coeffs)
            self.first_residual_ref = first_residual  # updated on computed steps only
            self.after_first_block = img
        elif index == self.num_blocks - 1:
            max_order = self.max_order if self.fbcache_taylor else 0
            self.residual = update_differences(self.residual, img - self.after_first_block, self.distance, max_order)
            self.after_first_block = None
        return img

    def _maybe_compiled(self, name: str, fn):
        """Eager, unless the blocks were compiled (then the cheap paths are compiled too, once)."""
        if self.forecast_backend is None:
            compiled = getattr(self.double_blocks[0], "_compiled_call_impl", None) is not None
            self.forecast_backend = ("inductor" if self.transformer.device.type == "cuda" else "aot_eager") \
                if compiled else "eager"
        if self.forecast_backend == "eager":
            return fn
        if name not in self._compiled:
            # Memory-bound elementwise work: skip the global coordinate-descent tuning (slow to compile, no gain).
            options = {"coordinate_descent_tuning": False} if self.forecast_backend == "inductor" else None
            self._compiled[name] = torch.compile(fn, backend=self.forecast_backend, fullgraph=True, dynamic=False,
                                                 options=options)
        return self._compiled[name]

    # -- as a participant of the step's CUDA graphs (utils/step_graphs.py) --
    def graph_kinds(self) -> "HarnessCache":
        """This cache as a StepKinds participant: its scheduled modes decide full or forecast from the step index, and
        begin_step / end_step (the transformer's hooks, which run around a replay too) do all the bookkeeping."""
        if self.mode not in SCHEDULED_MODES:
            raise StackError(f"feature caching --cache_mode {self.mode} decides each step from the data (a host sync "
                             f"after block 0), which a recorded CUDA graph cannot replay: use --compile_mode default, "
                             f"or a scheduled mode ({', '.join(SCHEDULED_MODES)})")
        return self

    def kind(self, step: int) -> tuple:
        return self.step_kind()

    def eager_now(self) -> bool:
        return self._counting is not None  # FLOPs are counted eagerly: a replay would count none

    def prepare(self, step: int) -> None:
        pass

    def captured(self) -> None:
        return None

    def replayed(self, step: int, state: None) -> None:
        pass

    # -- reporting --
    def stats(self) -> dict[str, Any]:
        """Counts of the most recent generation, FLOPs per step type, theoretical (FLOPs) speedup."""
        full_flops = self._flops_for("full")
        forecast_flops, window_flops = self._flops_for("forecast"), self._flops_for("forecast_window")
        forecasting = (forecast_flops or 0) * self.forecast_steps
        if self.windows and window_flops is not None:  # a window's first step forecasts for the whole window: the
            forecasting = window_flops * self.windows + (forecast_flops or 0) * (self.forecast_steps - self.windows)
            forecast_flops = forecasting / self.forecast_steps  # mean over the forecast steps
        dense = full_flops * (self.full_steps + self.forecast_steps) if full_flops else None
        actual = (full_flops * self.full_steps + forecasting) if full_flops else None
        return dict(mode=self.mode, interval=self.interval, max_order=self.max_order, first_enhance=self.first_enhance,
                    hicache_scale=self.hicache_scale, fbcache_threshold=self.fbcache_threshold,
                    fbcache_taylor=self.fbcache_taylor, full_steps=self.full_steps,
                    forecast_steps=self.forecast_steps, forecast_windows=self.windows,
                    step_kinds="".join("F" if k == "full" else "c" for k in self.step_kinds),  # F full, c cached
                    flops_full_step=full_flops, flops_forecast_step=forecast_flops,
                    flops_speedup=(dense / actual) if actual else None, cache_memory_bytes=self.cache_memory_bytes)

    def _flops_for(self, kind: str) -> int | None:
        found = [v for (m, k, _), v in self.flops.items() if k == kind and (kind == "full" or m == self.mode)]
        return found[-1] if found else None


class _BlockProxy:
    """What iterating a cached block list yields: calls go through HarnessCache.run_block."""

    def __init__(self, cache: HarnessCache, index: int, block: nn.Module):
        self.cache, self.index, self.block = cache, index, block

    def __call__(self, hidden_states, encoder_hidden_states, temb=None, image_rotary_emb=None,
                 joint_attention_kwargs=None, **extra):
        # FLUX's blocks take these; Qwen-Image's also encoder_hidden_states_mask and modulate_index (`extra`)
        kwargs = dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                      image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs, **extra)
        return self.cache.run_block(self.index, self.block, kwargs)

    def __getattr__(self, name):
        return getattr(self.block, name)


class _CachedBlockList(nn.ModuleList):
    """The same blocks (same state_dict keys); only iteration changes, to route calls through the cache."""

    harness_cache: HarnessCache | None = None
    harness_offset: int = 0

    def __iter__(self):
        cache = self.harness_cache
        return iter([_BlockProxy(cache, self.harness_offset + i, b) for i, b in enumerate(self._modules.values())])


# --- transformer-level hooks: step bookkeeping and FLOP counting ------------------------------------

def _shape_key(kwargs: dict[str, Any]) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor))


def _before_transformer(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    cache: HarnessCache = module.harness_cache
    cache.begin_step(kwargs)
    # Count FLOPs of the first call of each step type and shape (eagerly: compiled kernels bypass the counter).
    # For fbcache the step type is only known after block 0, so both kinds are counted on demand.
    shapes = _shape_key(kwargs)
    if cache.mode == "fbcache":  # the step type is known only after block 0: count the first generation's steps
        missing = cache.generation_index == 0 and any((cache.mode, k, shapes) not in cache.flops
                                                      for k in ("full", "forecast"))
    else:
        missing = (cache.mode, cache.flop_kind(), shapes) not in cache.flops
    cache._counting = None
    if missing:
        stance = torch.compiler.set_stance("force_eager")  # compiled kernels would bypass the counter
        counter = FlopCounterMode(display=False)
        counter.__enter__()
        cache._counting = (counter, stance, shapes)


def _after_transformer(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    cache: HarnessCache = module.harness_cache
    if cache._counting is not None:
        counter, stance, shapes = cache._counting
        counter.__exit__(None, None, None)
        stance.__exit__(None, None, None)  # back to the previous stance
        cache._counting = None
        cache.flops.setdefault((cache.mode, cache.flop_kind(), shapes), counter.get_total_flops())
    cache.end_step()


# --- entry point -----------------------------------------------------------------------------------

def apply_caching(pipeline, args: argparse.Namespace) -> str:
    """Attach the caching layer selected by --cache_mode; returns the stack's status line."""
    if args.cache_mode == "cache_dit":
        return apply_cache_dit(pipeline, args.cache_dit_config)
    if is_peer_mode(args.cache_mode):
        return apply_peer_cache(pipeline, args)
    cache = attach_cache(pipeline, args.cache_mode, interval=args.interval, max_order=args.max_order,
                         first_enhance=args.first_enhance, hicache_scale=args.hicache_scale,
                         fbcache_threshold=args.fbcache_threshold, fbcache_taylor=args.fbcache_taylor,
                         forecast_window=getattr(args, "forecast_window", False))
    return "applied: " + describe(cache)


def describe(cache: HarnessCache) -> str:
    if cache.mode in SCHEDULED_MODES:
        order = "" if cache.mode == "fora" else f", max_order {cache.max_order}"
        scale = f", scale {cache.hicache_scale}" if cache.mode == "hicache" else ""
        window = ", forecasts one pass per window" if cache.uses_window() else ""
        return f"{cache.mode} (interval {cache.interval}, first_enhance {cache.first_enhance}{order}{scale}{window})"
    if cache.mode == "fbcache":
        taylor = f" + Taylor order {cache.max_order}" if cache.fbcache_taylor else ""
        return f"fbcache (threshold {cache.fbcache_threshold}{taylor})"
    return cache.mode


def attach_cache(pipeline, mode: str, **params) -> HarnessCache:
    """Install the cache on `pipeline.transformer` (once) and return it; call again to change mode/params."""
    transformer = pipeline.transformer
    cache = getattr(transformer, "harness_cache", None)
    if cache is None:
        name = type(transformer).__name__
        if name not in ("FluxTransformer2DModel", "QwenImageTransformer2DModel"):
            raise StackError(f"feature caching supports FluxTransformer2DModel and QwenImageTransformer2DModel, not "
                             f"{name}")
        if getattr(transformer.config, "zero_cond_t", False):
            raise StackError("feature caching: this Qwen-Image transformer (zero_cond_t) picks each token's gate from "
                             "two modulations, which the forecast's one gate per block and slot cannot express; use "
                             "--disable_cache or a diffusers cache (--cache_mode diffusers_*)")
        # Dynamo does not guard compiled blocks on their submodules' forward hooks: code this process compiled for the
        # same block class without the capture hooks would be reused and capture nothing. Start from no compiled code.
        torch._dynamo.reset()
        cache = HarnessCache(transformer, pipeline.scheduler, mode, **params)
        transformer.harness_cache = cache
        offset = 0
        for name in ("transformer_blocks",) if cache.qwen else ("transformer_blocks", "single_transformer_blocks"):
            blocks = _CachedBlockList(list(getattr(transformer, name)))
            blocks.harness_cache, blocks.harness_offset = cache, offset
            offset += len(blocks)
            setattr(transformer, name, blocks)
        cache.hooks += [transformer.register_forward_pre_hook(_before_transformer, with_kwargs=True),
                        transformer.register_forward_hook(_after_transformer, with_kwargs=True, always_call=True)]
    else:
        cache.mode = mode
        for k, v in params.items():
            setattr(cache, k, v)
    if mode not in ALL_MODES:
        raise StackError(f"unknown cache mode {mode!r}: use one of {', '.join(ALL_MODES)}")
    cache.reset()
    cache.generation_index = -1  # the next generation is the first with this mode
    return cache


# --- cache-dit -------------------------------------------------------------------------------------

def apply_cache_dit(pipeline, config_path: str) -> str:
    """cache-dit's DBCache (+ its TaylorSeer, FoCa or DMD calibrator) through its public API, configured by a YAML
    file (configs/cache_dit*.yaml)."""
    import cache_dit

    configs = cache_dit.load_configs(config_path)
    cache_dit.enable_cache(pipeline, **{k: v for k, v in configs.items() if v is not None})
    pipeline.transformer.harness_cache = CacheDitStats(pipeline, configs)
    calibrator = configs.get("calibrator_config")
    described = configs["cache_config"].strify() + (f", {calibrator.strify()}" if calibrator is not None else "")
    return f"applied: cache-dit {cache_dit.__version__} from {config_path} ({described})"


class CacheDitStats(StepProbe):
    """stats() for cache-dit runs: the cached steps from cache-dit's own summary, read as each generation ends. FLOPs
    are None, with the reason in the record (`flops_note`)."""

    data_dependent = True
    # FlopCounterMode's module tracker walks the module tree, and cache-dit's cached-block wrappers refer back to the
    # transformer: the walk recurses until Python's limit (RecursionError in torch.utils.module_tracker).
    flops_unavailable = ("not counted: FlopCounterMode's module tracker recurses without end through cache-dit's "
                         "cached-block wrappers, which refer back to the transformer")

    def __init__(self, pipeline, configs: dict[str, Any]):
        self.configs = configs
        super().__init__(pipeline, "cache_dit")

    def full_kind(self) -> str:
        return "full"

    def counted_kind(self) -> None:
        return None  # cache-dit's summary says which steps were cached once the generation ends

    def library_kind(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        import cache_dit

        # cache-dit books a generation's cached steps when its pipeline call returns
        cached = set(cache_dit.summary(self.pipeline, logging=False)[-1].cached_steps or [])
        self.kinds = ["cached" if step in cached else "full" for step in range(len(self.kinds))]
        return super().stats()

    def extra_stats(self) -> dict[str, Any]:
        return dict(cache_dit_config={k: str(v) for k, v in self.configs.items() if v is not None})

"""FlashAttention-3 for FLUX as a `torch.library.custom_op`, so that torch.compile and torch.export
trace it as one opaque node (its `register_fake` gives the output's shape), plus the attention
processors that route FLUX's and Qwen-Image's joint attention through it.

FA3 is imported from upstream (`flash_attn_interface`) or from the forward-only `fa3-fwd` wheel
(`fa3_fwd_interface`). flux-fast imported it unconditionally, so a standard install without FA3
failed at import; here a missing FA3 is a notice, and the op falls back to PyTorch SDPA (which
picks cuDNN on H100, the fastest SDPA backend there).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula
from diffusers.models.transformers.transformer_flux import FluxAttention, _get_qkv_projections
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0, apply_rotary_emb_qwen
from diffusers.models.embeddings import apply_rotary_emb

FP8 = torch.float8_e4m3fn


def _import_fa3():
    """(flash_attn_func, module name) from whichever FA3 build is installed, or (None, reason)."""
    reasons = []
    for name in ("flash_attn_interface", "fa3_fwd_interface"):
        try:
            return importlib.import_module(name).flash_attn_func, name
        except Exception as e:  # ImportError, or a broken build raising OSError/RuntimeError on load
            reasons.append(f"{name}: {type(e).__name__}: {e}")
    return None, "; ".join(reasons)


_FA3_FUNC, FA3_SOURCE = _import_fa3()
FA3_AVAILABLE = _FA3_FUNC is not None


def fa3_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not FA3_AVAILABLE:
        return f"FA3 not installed (pip install fa3-fwd, or build flash-attention/hopper) [{FA3_SOURCE}]"
    if torch.cuda.get_device_capability()[0] != 9:
        return f"FA3 needs a Hopper GPU (sm_90), found {torch.cuda.get_device_name()}"
    return None


def _sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@torch.library.custom_op("flux_harness::fa3_attention", mutates_args=(), device_types=None)
def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention on (batch, seq, heads, head_dim) tensors. Output in q's dtype, or bf16 for float8 e4m3
    q/k/v (FA3's fp8 kernel's output; see `fa3_fp8_attention`).

    FA3 on a Hopper GPU; PyTorch SDPA otherwise (the fallback kernel; float8 inputs upcast to bf16), so the same
    graph runs on CPU. No dtype argument: torch 2.11's AOTInductor proxy executor hands a custom op's dtype argument
    over in the export schema's numbering (bf16 arrived as c10's quint8, pytorch/pytorch#169157, fixed by #173562),
    which broke the fp8 op inside the exported blocks.
    """
    out_dtype = _fa3_out_dtype(q)
    if FA3_AVAILABLE and q.is_cuda:
        out = _FA3_FUNC(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        return out.to(out_dtype)
    return _sdpa_bshd(q.to(out_dtype), k.to(out_dtype), v.to(out_dtype)).contiguous()


def _fa3_out_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if q.dtype == FP8 else q.dtype


def fa3_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FA3 on q/k/v cast to float8 e4m3 without scales, as flux-fast does; output in q's dtype.

    The casts are here, outside the opaque op, so that torch.compile fuses them into the kernels that make q/k/v
    (QK RMSNorm + RoPE) instead of running three copies per call inside the op: those took 3.9 ms of a 90.6 ms
    float8 step on the H200. Measured on H100 at FLUX shapes (docs/RESULTS.md): relative error 5.3e-2 vs float64 (bf16: 2.3e-3), 894 vs 671
    TFLOP/s. Per-head scaling gave the same error (e4m3's 3-bit mantissa, not its range, limits it) at 2.6x the
    time, so it is not used.
    """
    return fa3_attention(q.to(FP8), k.to(FP8), v.to(FP8)).to(q.dtype)


def fa3_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """bf16 FA3 attention and its per-row log-sum-exp of the scaled scores (natural log, (batch, heads, seq),
    float32), which FA3 computes anyway: Chipmunk's dense steps need it for the softmax column sums. Not a custom
    op: it runs inside Chipmunk's own opaque op. The log-sum-exp is None where FA3 cannot give it."""
    if FA3_AVAILABLE and q.is_cuda:
        try:
            out, lse = _FA3_FUNC(q, k, v, return_attn_probs=True)[:2]
        except TypeError:  # a build whose flash_attn_func has no return_attn_probs
            return fa3_attention(q, k, v), None
        if lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
            return out.to(q.dtype), None
        return out.to(q.dtype), lse.float()
    return fa3_attention(q, k, v), None


@fa3_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q, dtype=_fa3_out_dtype(q), memory_format=torch.contiguous_format)


@register_flop_formula(torch.ops.flux_harness.fa3_attention)
def _fa3_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """An opaque custom op counts 0 FLOPs in FlopCounterMode unless told: QK^T and PV, 2 FLOPs per MAC."""
    batch, q_len, heads, head_dim = q_shape
    return 4 * batch * heads * q_len * k_shape[1] * head_dim


class FluxKernelAttnProcessor:
    """FLUX joint attention (fused or unfused QKV projections) with a swappable attention kernel: the
    projections, QK norms, RoPE and output projections are those of diffusers' `FluxAttnProcessor`;
    subclasses define `attend(q, k, v, block_input)` on (batch, seq, heads, head_dim) tensors; `block_input` is the
    attention's hidden_states in a single block (its normalised input, which the block's MLP shares), for a kernel
    that runs beside other work of the block reading it (Chipmunk's MLP). Most ignore it."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               block_input: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        if attention_mask is not None:
            raise NotImplementedError(f"{type(self).__name__} takes no attention mask (FLUX uses none)")
        block_input = hidden_states if encoder_hidden_states is None else None
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.attend(query, key, value, block_input).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class FA3FluxAttnProcessor(FluxKernelAttnProcessor):
    """FLUX attention through the FA3 custom op (bf16, or fp8 q/k/v)."""

    def __init__(self, fp8: bool = False):
        self.fp8 = fp8

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               block_input: torch.Tensor | None = None) -> torch.Tensor:
        return fa3_fp8_attention(q, k, v) if self.fp8 else fa3_attention(q, k, v)


class FA3QwenAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """Qwen-Image's joint attention (diffusers' QwenDoubleStreamAttnProcessor2_0: separate q/k/v projections per
    stream, QK RMSNorm, Qwen's complex RoPE, [text, image] order) with the kernel replaced by the FA3 op (bf16, or
    fp8 q/k/v). The projections, norms and RoPE are diffusers' own modules and function. A text mask (a batch of
    prompts of different lengths) needs a masked kernel, which the FA3 op is not: such calls go to diffusers'
    processor unchanged."""

    def __init__(self, fp8: bool = False):
        super().__init__()
        self.fp8 = fp8

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states_mask is not None or attention_mask is not None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)
        head_dim = attn.inner_dim // attn.heads
        split = lambda x: x.unflatten(-1, (-1, head_dim))  # noqa: E731
        img_q, img_k, img_v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(
            attn.to_v(hidden_states))
        txt_q, txt_k, txt_v = (split(attn.add_q_proj(encoder_hidden_states)),
                               split(attn.add_k_proj(encoder_hidden_states)),
                               split(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)
        query, key, value = (torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1),
                             torch.cat([txt_v, img_v], dim=1))
        out = (fa3_fp8_attention(query, key, value) if self.fp8 else fa3_attention(query, key, value))
        out = out.flatten(2, 3).to(query.dtype)
        seq_txt = encoder_hidden_states.shape[1]
        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.contiguous())

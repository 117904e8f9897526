"""Chipmunk on diffusers' FLUX transformer, attached through module replacement and attention processors.

  * double blocks: the joint attention's processor calls the sparse attention; the image MLP (`ff`) becomes
    ChipmunkFeedForward; the text MLP (`ff_context`) stays dense;
  * single blocks become ChipmunkSingleBlock, whose forward reads the block's data flow in order: norm, start the
    sparse MLP (beside the attention), attention, then the attention's output projection joined with the MLP;
  * the transformer's image tokens are reordered into patches on the way in, and back on the way out (hooks).

Names and roles are kept for the feature-caching layer (applied after this one): double blocks keep `attn` (returns
(img, txt)), `ff`, `ff_context`; single blocks keep `norm`, `attn` and `proj_out`, whose output is still the block's
one pre-gate feature (attention part + MLP part + linear2's bias once).

Forecast steps of feature caching call none of these modules. Chipmunk's caches are then left untouched, and a dense
refresh (or MLP reselection) that the schedule placed on a step this layer did not compute is carried out on the next
step it does compute ("deferred dense", config.due_since). When every step is computed (no caching, or interval=1)
that is the plain schedule, so the interval=1 check's C and D run the same computation with no special case.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from utils.attention import FA3FluxAttnProcessor, FluxKernelAttnProcessor, fa3_attention_with_lse
from utils.chipmunk.config import ChipmunkConfig, PatchifyConfig, load_chipmunk_config
from utils.chipmunk.layers import (DenseAttention, SparseAttention, SparseMlp, chipmunk_attention_op,
                                   chipmunk_mlp_join_op, chipmunk_mlp_op, chipmunk_mlp_start_op, kernels_status,
                                   triton_kernels)
from utils.chipmunk.reference import patch_order
from utils.errors import StackError
from utils.step_clock import StepClock


# --- token reorder ---------------------------------------------------------------------------------

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


# --- attention -------------------------------------------------------------------------------------

class ChipmunkAttnProcessor(FluxKernelAttnProcessor):
    """FLUX joint attention with Chipmunk's sparse deltas in place of the attention kernel. `mlp_beside`: the
    block's MLP runs beside it from the same input, which the op then holds until the MLP has read it."""

    def __init__(self, layer: SparseAttention):
        self.layer, self.mlp_beside = layer, False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               block_input: torch.Tensor | None = None) -> torch.Tensor:
        if not self.mlp_beside:
            block_input = None
        return chipmunk_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), self.layer, block_input)


def dense_attention_like(processor) -> DenseAttention:
    """The dense kernel for Chipmunk's dense steps, after the stack's step 2: bf16 FA3 with its rows' log-sum-exp
    where FA3 runs, fp8 or not (the key selection's column sums reuse it; FA3 fp8's comes from fp8 scores, and
    without it the sums take a row pass of their own: bf16 FA3 0.389 ms + sums 0.317 ms against fp8 FA3 0.292 ms +
    sums with the row pass 0.663 ms per layer at 4608 tokens, the FA3 times on the H100, the sums' on the H200);
    else SDPA."""
    if isinstance(processor, FA3FluxAttnProcessor):
        return DenseAttention(fa3_attention_with_lse, with_lse=True)
    return DenseAttention(lambda q, k, v: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).contiguous(), with_lse=False)


# --- MLPs ------------------------------------------------------------------------------------------

class ChipmunkFeedForward(nn.Module):
    """Replaces a double block's image `ff` (same name, same role: returns the MLP output with fc2's bias).
    Holds the weights as its own parameters, so float8 quantization (which targets nn.Linear) leaves the
    sparse gathers on bf16 weights."""

    def __init__(self, ff: nn.Module, index: int, clock: StepClock, config, kernels):
        super().__init__()
        self.w1, self.b1 = ff.net[0].proj.weight, ff.net[0].proj.bias
        self.w2, self.b2 = ff.net[2].weight, ff.net[2].bias
        self.layer = SparseMlp(index, clock, config, self.w1, self.b1, self.w2, self.b2, kernels)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return chipmunk_mlp_op(hidden_states, self.layer, self.w2.shape[0])


class ChipmunkSingleProjOut(nn.Module):
    """A single block's `proj_out` (linear2) split into the attention-output part and the MLP's fc2. Input: the
    attention output; output: the block's pre-gate feature = attn @ Wa^T + bias + MLP(x), with linear2's bias added
    ONCE (Chipmunk's reference adds it in both halves). The MLP step, started from the block's normalised input x
    before the attention, is joined after the attention's output projection, whose matmul runs while the MLP may
    still run on the side stream."""

    def __init__(self, proj_out: nn.Linear, proj_mlp: nn.Linear, index: int, clock: StepClock, config, kernels):
        super().__init__()
        dim = proj_out.out_features
        self.dim = dim
        # The attention-output part stays an nn.Linear (with linear2's bias, added once), so the float8 layer
        # quantizes it like every other dense projection; only fc2's half is held for the sparse gathers.
        self.attn_out = nn.Linear(dim, dim, bias=proj_out.bias is not None, device="meta")  # no init: replaced
        self.attn_out.weight = nn.Parameter(proj_out.weight[:, :dim].detach(), requires_grad=False)
        if proj_out.bias is not None:
            self.attn_out.bias = proj_out.bias
        self.w1, self.b1 = proj_mlp.weight, proj_mlp.bias
        self.w2 = nn.Parameter(proj_out.weight[:, dim:].detach(), requires_grad=False)
        self.mlp = SparseMlp(index, clock, config, self.w1, self.b1, self.w2, None, kernels)

    def forward(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.attn_out(attn_output) + chipmunk_mlp_join_op(attn_output, self.mlp, self.dim)


class ChipmunkSingleBlock(nn.Module):
    """FluxSingleTransformerBlock with Chipmunk's sparse MLP beside its attention (the same input feeds both), and
    the same parameters (`norm`, `attn`, the MLP's weights under `proj_out`)."""

    def __init__(self, block: nn.Module, index: int, clock: StepClock, config, kernels):
        super().__init__()
        self.norm, self.attn = block.norm, block.attn
        self.proj_out = ChipmunkSingleProjOut(block.proj_out, block.proj_mlp, index, clock, config, kernels)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                joint_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        normed, gate = self.norm(x, emb=temb)
        chipmunk_mlp_start_op(normed, self.proj_out.mlp)  # the MLP step starts here, beside what follows
        attn = self.attn(hidden_states=normed, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
        x = x + gate.unsqueeze(1) * self.proj_out(attn)  # attention projected, MLP joined
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x[:, :text_len], x[:, text_len:]


# --- applying it to a FLUX pipeline ----------------------------------------------------------------

KERNELS = ("auto", "triton", "reference")


def apply_chipmunk(pipeline, args) -> str:
    """Layer 3 of optimize(): sparse attention and MLP deltas on the FLUX transformer, token reorder hooks.
    Returns the stack's status line."""
    config = load_chipmunk_config(args.chipmunk_config, height=args.height, width=args.width,
                                  pixels_per_token=getattr(pipeline, "vae_scale_factor", 8) * 2)
    return apply_chipmunk_config(pipeline, config)


def apply_chipmunk_config(pipeline, config: ChipmunkConfig, kernels: str = "auto") -> str:
    """`kernels`: "auto" (the Triton kernels on a GPU, the PyTorch reference on CPU), "triton" (also on CPU, through
    Triton's interpreter when TRITON_INTERPRET=1: how the tests run the kernels' path without a GPU) or
    "reference"."""
    transformer = pipeline.transformer
    if kernels not in KERNELS:
        raise StackError(f"Chipmunk kernels {kernels!r}: one of {', '.join(KERNELS)}")
    ops = None if kernels == "reference" else triton_kernels()
    if kernels == "triton" and ops is None:
        raise StackError(f"Chipmunk kernels 'triton' are unavailable here: "
                         f"{kernels_status(None, torch.device('cuda'))}")
    if kernels == "auto" and transformer.device.type != "cuda":
        ops = None
    clock = StepClock(pipeline.scheduler)
    doubles = len(transformer.transformer_blocks)
    a, m = config.attn, config.mlp
    dense = None
    layers = []  # every sparse layer, for the step graphs (graphs.py) and the counts
    for index, block in enumerate(list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)):
        attention = None
        if a.is_enabled and index >= a.first_n_dense_layers:
            dense = dense or dense_attention_like(block.attn.processor)  # one for all: it checks FA3's LSE once
            attention = SparseAttention(index, clock, a, dense, ops)
            block.attn.set_processor(ChipmunkAttnProcessor(attention))
            layers.append(attention)
        if not (m.is_enabled and index >= m.first_n_dense_layers):
            continue
        if index < doubles:  # image MLP sparse; the text MLP (ff_context) stays dense
            block.ff = ChipmunkFeedForward(block.ff, index, clock, m, ops)
            layers.append(block.ff.layer)
        else:
            single = ChipmunkSingleBlock(block, index, clock, m, ops)
            transformer.single_transformer_blocks[index - doubles] = single
            layers.append(single.proj_out.mlp)
            if attention is not None:  # the attention waits until the MLP beside it has read their input
                attention.mlp_beside = single.proj_out.mlp
                single.attn.processor.mlp_beside = True
                single.proj_out.mlp.beside_attention = True
    # Regional compile finds the blocks by class name.
    transformer._repeated_blocks = [*type(transformer)._repeated_blocks, ChipmunkSingleBlock.__name__]
    transformer.chipmunk_layers, transformer.chipmunk_config = layers, config
    sparse_attn = sum(isinstance(layer, SparseAttention) for layer in layers)
    reorder = "off"
    if config.patchify.is_enabled:
        hooks = TokenReorder(config.patchify)
        transformer.register_forward_pre_hook(hooks.pre_hook, with_kwargs=True)
        transformer.register_forward_hook(hooks.post_hook, with_kwargs=True)
        transformer.chipmunk_reorder = hooks
        p = config.patchify
        reorder = f"{p.chunk_size_1}x{p.chunk_size_1}/{p.chunk_size_2}x{p.chunk_size_2} patches"
    dense_kernel = "" if dense is None else ", bf16 FA3" if dense.with_lse else ", SDPA"
    float8 = "; fc1 and fc2 in float8" if m.is_fp8 else ""
    return (f"applied: attention top {a.top_keys:.3g} keys per {a.mbm}-query group on {sparse_attn} layers "
            f"(dense every {a.full_step_every}{dense_kernel}); MLP top {m.top_keys:.3g}+{m.random_keys:.3g} random "
            f"neurons per {m.bm}-token block on {len(layers) - sparse_attn} layers (dense every {m.full_step_every}"
            f"{float8}); token reorder {reorder}; kernels: {kernels_status(ops, transformer.device)}")


def chipmunk_stats(pipeline) -> dict[str, dict[str, int]]:
    """Dense/sparse/reselect counts per sparse layer (for tests and reports)."""
    return {layer.name: dict(layer.stats) for layer in getattr(pipeline.transformer, "chipmunk_layers", [])}

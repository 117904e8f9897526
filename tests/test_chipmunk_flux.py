"""Chipmunk on diffusers' FLUX transformer (utils/chipmunk/flux.py), on the tiny pipeline with the PyTorch reference
(CPU, float32): what apply_chipmunk_config replaces, the token reorder, the single block (linear2's bias once, the
MLP started before the attention, a proj_out on its own refused), the schedule from the step index, feature caching
on top (deferred refreshes, the interval=1 three-way check), and regional compile (one graph per block kind, the
MLP's start ahead of the QKV matmul in inductor's code)."""

import re

import pytest
import torch

from chipmunk_support import STEPS, TINY_CONFIG, ManualClock, latents, rel, write_config
from utils import chipmunk
from utils.benchmark_utils import pipeline_call_kwargs
from utils.chipmunk import flux, layers
from utils.chipmunk.config import MlpConfig, load_chipmunk_config
from utils.errors import StackError
from utils.pipeline_utils import load_pipeline


@pytest.fixture(scope="module")
def dense_latents():
    from conftest import tiny_args

    return latents(tiny_args)[0]


def _tiny_pipeline(make_args):
    return load_pipeline(make_args("--disable_bf16"))


# --- what apply_chipmunk_config replaces -------------------------------------------------------------

def test_apply_wires_sparse_layers_into_the_blocks_past_the_dense_ones(make_args):
    pipe = _tiny_pipeline(make_args)
    transformer = pipe.transformer
    doubles = len(transformer.transformer_blocks)
    assert 1 <= doubles < 5, doubles  # both kinds of block are sparse in the tiny model (first_n_dense_layers 1)
    dense_ff = transformer.transformer_blocks[0].ff
    status = flux.apply_chipmunk_config(pipe, load_chipmunk_config(TINY_CONFIG))
    assert status.endswith("token reorder 4x4/2x2 patches; kernels: PyTorch reference (CPU)"), status
    assert "on 5 layers (dense every 4, SDPA); MLP top 0.3+0.05 random neurons per 64-token block on 5 layers" in status
    assert transformer.transformer_blocks[0].ff is dense_ff  # block 0 stays dense
    assert isinstance(transformer.transformer_blocks[1].ff, flux.ChipmunkFeedForward)
    assert not isinstance(transformer.transformer_blocks[1].ff_context, flux.ChipmunkFeedForward)  # text MLP dense
    singles = list(transformer.single_transformer_blocks)
    assert singles and all(isinstance(b, flux.ChipmunkSingleBlock) for b in singles)
    assert "ChipmunkSingleBlock" in transformer._repeated_blocks  # regional compile finds them
    attention = [l for l in transformer.chipmunk_layers if isinstance(l, layers.SparseAttention)]
    mlps = [l for l in transformer.chipmunk_layers if isinstance(l, layers.SparseMlp)]
    assert [l.index for l in attention] == [l.index for l in mlps] == [1, 2, 3, 4, 5]
    assert all(l.kernels is None for l in transformer.chipmunk_layers)  # auto on CPU: the reference path
    assert len({id(l.dense) for l in attention}) == 1  # one dense attention per transformer: its LSE checked once
    for layer in attention:  # a single block's attention waits for the MLP beside it; a double block's has none
        assert (layer.mlp_beside is not None) == (layer.index >= doubles)
    for block, mlp in zip(singles, mlps[doubles - 1:]):
        assert block.proj_out.mlp is mlp and mlp.beside_attention and block.attn.processor.mlp_beside
    assert chipmunk.chipmunk_stats is flux.chipmunk_stats
    assert set(chipmunk.chipmunk_stats(pipe)) == {f"{kind} layer {i}" for kind in ("attention", "MLP")
                                                  for i in range(1, 6)}


def test_kernels_are_chosen_when_applied_and_an_unknown_or_unavailable_choice_is_refused(make_args):
    from utils.chipmunk import kernels

    config = load_chipmunk_config(TINY_CONFIG)
    with pytest.raises(StackError, match="Chipmunk kernels 'cuda': one of auto, triton, reference"):
        flux.apply_chipmunk_config(_tiny_pipeline(make_args), config, kernels="cuda")
    pipe = _tiny_pipeline(make_args)
    assert "kernels: PyTorch reference (CPU)" in flux.apply_chipmunk_config(pipe, config, kernels="reference")
    assert all(l.kernels is None for l in pipe.transformer.chipmunk_layers)
    if kernels.TRITON_AVAILABLE:
        pytest.skip("the Triton kernels run here (a GPU, or TRITON_INTERPRET=1), so kernels='triton' is not refused; "
                    "tests/interpreted/test_layers_on_kernels.py runs them")
    with pytest.raises(StackError, match="Chipmunk kernels 'triton' are unavailable here: PyTorch reference "
                                         r"\(SLOW: Triton unavailable: "):
        flux.apply_chipmunk_config(_tiny_pipeline(make_args), config, kernels="triton")


# --- token reorder ----------------------------------------------------------------------------------

def test_dense_steps_run_bf16_fa3_for_its_log_sum_exp_whatever_fa3_the_stack_chose():
    """FA3 fp8's log-sum-exp comes from fp8 scores, and without one the key selection's column sums take a row pass
    of their own: Chipmunk's dense steps run bf16 FA3 with its log-sum-exp under --fa3_fp8 too; SDPA elsewhere."""
    from utils.attention import FA3FluxAttnProcessor, fa3_attention_with_lse

    for fp8 in (False, True):
        dense = flux.dense_attention_like(FA3FluxAttnProcessor(fp8=fp8))
        assert dense.kernel is fa3_attention_with_lse and dense.with_lse
    sdpa = flux.dense_attention_like(object())
    q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
    out, lse = sdpa(q, k, v, None)
    assert not sdpa.with_lse and lse is None
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_token_reorder_alone_keeps_the_dense_output(make_args, tmp_path, dense_latents):
    path = write_config(tmp_path, attn={"is_enabled": False}, mlp={"is_enabled": False})
    out, _ = latents(make_args, "--chipmunk_config", path)
    assert rel(out, dense_latents) < 1e-5  # only the attention summation order changes


# --- the single block -------------------------------------------------------------------------------

def _single_block():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    torch.manual_seed(3)
    block = FluxSingleTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16)
    torch.nn.init.normal_(block.proj_out.bias, std=1.0)  # a bias large enough to see twice
    return block


def test_single_block_proj_out_adds_linear2_bias_once():
    block = _single_block()
    attn_out, x = torch.randn(1, 40, 32), torch.randn(1, 40, 32)
    expected = block.proj_out(torch.cat([attn_out, block.act_mlp(block.proj_mlp(x))], dim=2))
    clock = ManualClock()  # the first step: dense
    split = flux.ChipmunkSingleProjOut(block.proj_out, block.proj_mlp, 7, clock, MlpConfig(bm=16), None)
    split.mlp.start(x)  # the MLP starts from the block's normalised input, before the attention
    torch.testing.assert_close(split(attn_out), expected, rtol=1e-5, atol=1e-5)
    # The attention-output half is an nn.Linear, so the float8 layer quantizes it like the other projections.
    assert [name for name, m in split.named_modules() if isinstance(m, torch.nn.Linear)] == ["attn_out"]


def test_chipmunk_single_block_at_a_dense_step_is_the_diffusers_block():
    """ChipmunkSingleBlock (norm, MLP started, attention, projection + join) against the block it replaces, with the
    block's own attention processor: at a dense step the MLP is the dense one, so the outputs agree."""
    block = _single_block()
    hidden, context, temb = torch.randn(1, 40, 32), torch.randn(1, 8, 32), torch.randn(1, 32)
    with torch.no_grad():
        expected = block(hidden, context, temb)
        got = flux.ChipmunkSingleBlock(block, 7, ManualClock(), MlpConfig(bm=16), None)(hidden, context, temb)
    assert [t.shape for t in got] == [(1, 8, 32), (1, 40, 32)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_single_blocks_start_their_mlp_before_the_attention_with_the_same_latents_as_inline(make_args, monkeypatch):
    """A single block's MLP input is its attention's input. Its whole MLP step starts before the attention's
    projections (on a side stream on a GPU once its sparse kernels have run; in place on CPU) and proj_out joins it
    after the attention. The double blocks' image MLPs run in their own call, after their attention. Latents equal,
    bit for bit, those of the same blocks with the MLP computed inline in the join instead."""
    events, side_asked = [], []
    start, join, call, attend = layers.SparseMlp.start, layers.SparseMlp.join, layers.SparseMlp.__call__, \
        layers.SparseAttention.__call__
    side = layers.SparseMlp._side

    def spy(kind, original):
        def wrapped(self, *args):
            events.append((kind, self.index, self.clock.step))
            return original(self, *args)
        return wrapped

    def spy_side(self, device):
        side_asked.append((self.index, self.clock.step))
        return side(self, device)

    monkeypatch.setattr(layers.SparseMlp, "start", spy("start", start))
    monkeypatch.setattr(layers.SparseMlp, "join", spy("join", join))
    monkeypatch.setattr(layers.SparseMlp, "__call__", spy("call", call))
    monkeypatch.setattr(layers.SparseAttention, "__call__", spy("attention", attend))
    monkeypatch.setattr(layers.SparseMlp, "_side", spy_side)
    ahead, pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG)
    doubles = len(pipe.transformer.transformer_blocks)
    singles = range(doubles, 6)
    for step in range(STEPS):
        for index in range(1, 6):
            kinds = [kind for kind, i, t in events if (i, t) == (index, step)]
            assert kinds == (["start", "attention", "join"] if index in singles else ["attention", "call"]), \
                (index, step, kinds)
    # The side stream is asked for from step 2: steps 0 and 1 (whose sparse step tunes the kernels) run in place
    # with nothing beside them. The dense step 4 runs beside the attention too. (On CPU there is no side stream.)
    assert sorted(side_asked, key=lambda a: a[::-1]) == [(i, t) for t in range(2, STEPS) for i in singles]

    def generate():
        events.clear(), side_asked.clear()
        return pipe(**pipeline_call_kwargs(make_args("--num_inference_steps", str(STEPS))),
                    generator=torch.manual_seed(make_args().seed), output_type="latent").images

    assert torch.equal(generate(), ahead)  # a second generation: every step beside the attention
    assert sorted(side_asked) == [(i, t) for i in singles for t in range(STEPS)]

    def start_nothing(self, x):  # inline: the MLP is computed from x when joined, after the attention
        events.append(("start", self.index, self.clock.step))
        self.started = ("inline", x)

    def join_inline(self, like):
        events.append(("join", self.index, self.clock.step))
        (_, x), self.started = self.started, None
        return self(x)

    monkeypatch.setattr(layers.SparseMlp, "start", start_nothing)
    monkeypatch.setattr(layers.SparseMlp, "join", join_inline)
    events.clear(), side_asked.clear()
    inline, pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG)
    for step in range(STEPS):
        for index in singles:
            assert [kind for kind, i, t in events if (i, t) == (index, step)] == ["start", "attention", "join", "call"]
    assert not side_asked  # the inline step never runs beside the attention
    assert torch.equal(ahead, inline)


def test_a_single_blocks_proj_out_alone_is_refused(make_args):
    """A single block's proj_out has no MLP input: its MLP starts in the block's forward. Called without the block
    having run this step, it says so instead of computing an MLP from the attention output."""
    _, pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG, steps=2)
    proj_out = pipe.transformer.single_transformer_blocks[0].proj_out
    with pytest.raises(RuntimeError, match=r"its step starts in its block's forward, which did not run at step 2 "
                                           r"\(a block's proj_out called on its own\?\)"):
        proj_out(torch.randn(1, 8, proj_out.dim))


# --- the schedule in the pipeline ---------------------------------------------------------------------

def test_sparsity_off_equals_the_dense_model(make_args, tmp_path, dense_latents):
    path = write_config(tmp_path, attn={"top_keys": 1.0}, mlp={"top_keys": 1.0, "random_keys": 0.0})
    out, pipe = latents(make_args, "--chipmunk_config", path)
    stats = chipmunk.chipmunk_stats(pipe)
    assert stats["attention layer 2"]["sparse"] == 3 and stats["MLP layer 5"]["sparse"] == 4  # sparse path ran
    assert rel(out, dense_latents) < 1e-5


def test_schedule_comes_from_the_step_index_and_resets_per_generation(make_args, dense_latents):
    out, pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG)
    stats = chipmunk.chipmunk_stats(pipe)
    assert "attention layer 0" not in stats and "MLP layer 0" not in stats  # first_n_dense_layers: 1
    assert len(stats) == 10  # layers 1..5: one attention + one MLP each
    for index in range(1, 6):
        assert stats[f"attention layer {index}"] == {"dense": 3, "sparse": 3, "reselect": 0}  # 0,1,4 | 2,3,5
        assert stats[f"MLP layer {index}"] == {"dense": 2, "sparse": 4, "reselect": 3}  # 0,4 | 1,2,3,5 | 1,3,5
    assert torch.isfinite(out).all() and 1e-4 < rel(out, dense_latents) < 0.05  # sparse, and close to dense
    pipe(**pipeline_call_kwargs(make_args("--num_inference_steps", "3")), generator=torch.manual_seed(0),
         output_type="latent")  # a second generation resets every layer at its first step
    assert chipmunk.chipmunk_stats(pipe)["MLP layer 1"] == {"dense": 3, "sparse": 6, "reselect": 4}  # + 0 | 1,2 | 1


# --- feature caching on top -------------------------------------------------------------------------

def test_hicache_interval3_on_chipmunk_defers_refreshes_and_gives_an_image(make_args):
    chip, _ = latents(make_args, "--chipmunk_config", TINY_CONFIG, steps=10)
    both, pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG, "--cache_mode", "hicache", "--interval", "3",
                         steps=10)
    # full steps 0,1,2,5,8; attention dense on 0,1,4->5,8; MLP dense on 0,4->5,8, reselect on 1
    stats = chipmunk.chipmunk_stats(pipe)
    assert stats["attention layer 3"] == {"dense": 4, "sparse": 1, "reselect": 0}
    assert stats["MLP layer 3"] == {"dense": 3, "sparse": 2, "reselect": 1}
    assert torch.isfinite(both).all() and rel(both, chip) < 0.05  # an image near Chipmunk's, not noise


def test_a_float8_mlp_gives_chipmunks_image_within_float8_precision(make_args, tmp_path):
    """mlp.is_fp8 (fc1 and fc2 on the float8 values, multiplied in float32 here): the latents within
    float8's precision of Chipmunk's in full precision (their relative error 0.2% on the tiny pipeline), not noise;
    the same decisions; the stack line says which GEMMs run in float8."""
    chip, chip_pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG)
    fp8, pipe = latents(make_args, "--chipmunk_config", write_config(tmp_path, mlp={"is_fp8": True}))
    assert "fc1 and fc2 in float8" in pipe.harness_stack["chipmunk"]
    assert chipmunk.chipmunk_stats(pipe) == chipmunk.chipmunk_stats(chip_pipe)
    assert torch.isfinite(fp8).all() and 0 < rel(fp8, chip) < 0.02


def test_interval1_three_way_check(make_args):
    from utils.interval1_check import run_interval1_check

    rows, passed = run_interval1_check(make_args("--disable_bf16", "--num_inference_steps", str(STEPS),
                                                 "--chipmunk_config", TINY_CONFIG), tolerance=1e-6)
    by_pair = {r["pair"]: r for r in rows}
    assert by_pair["B vs A"]["bitwise_equal"], by_pair["B vs A"]
    assert by_pair["D vs C"]["rel_error"] <= 1e-6, by_pair["D vs C"]
    assert by_pair["D vs B"]["rel_error"] > 1e-4  # Chipmunk really changed something
    assert passed


# --- regional compile -------------------------------------------------------------------------------

def _chipmunk_latents(make_args, backend=None):
    args = make_args("--disable_bf16", "--chipmunk_config", TINY_CONFIG)
    pipe = load_pipeline(args)
    chipmunk.apply_chipmunk(pipe, args)
    if backend:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)  # fullgraph: a break would raise
    out = pipe(**pipeline_call_kwargs(make_args("--num_inference_steps", "4")), generator=torch.manual_seed(0),
               output_type="latent").images
    assert chipmunk.chipmunk_stats(pipe)["attention layer 5"] == {"dense": 2, "sparse": 2, "reselect": 0}
    return out


def test_chipmunk_blocks_compile_once_per_block_kind_without_graph_breaks_and_match_eager(make_args):
    """aot_eager runs the functionalized graph the way inductor sees it: the ops' real outputs must have the
    strides their fakes promise (the reference attention's did not), and no cache may alias an output.
    Regional compile must trace a block kind once, not once per layer: on FLUX's 19 + 38 blocks a per-layer
    guard passes dynamo's recompile limit and fullgraph fails. The layers are opaque objects that dynamo passes
    as graph inputs without guarding on which layer it is."""
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    eager = _chipmunk_latents(make_args)
    assert torch.isfinite(eager).all()
    torch._dynamo.reset()  # graphs other tests left on the same block code would be reused, not counted
    torch.testing.assert_close(_chipmunk_latents(make_args, counting_aot_eager), eager, rtol=0, atol=1e-6)
    # 2 double-block graphs (block 0 keeps its dense FeedForward: first_n_dense_layers 1) + 2 single-block graphs
    # (the first single block's inputs are contiguous, the later ones get views of the joint sequence): 2 + 4
    # Chipmunk layers would give 6 with per-layer guards.
    assert len(graphs) == 4
    ops = [sorted({str(n.target) for n in gm.graph.nodes if "flux_harness" in str(n.target)}) for gm in graphs]
    assert sorted(ops) == [[], ["flux_harness.chipmunk_attention.default", "flux_harness.chipmunk_mlp.default"]] + \
        [["flux_harness.chipmunk_attention.default", "flux_harness.chipmunk_mlp_join.default",
          "flux_harness.chipmunk_mlp_start.default"]] * 2


def test_a_single_blocks_compiled_code_starts_its_mlp_before_the_qkv_matmul_and_copies_nothing(make_args):
    """Read inductor's code for a single block (CPU code; the scheduling is inductor's, not the backend's). The MLP's
    start op must come before the QKV matmul that reads the same normalised input (inductor moves a pure op down to
    the attention op: the start op declares its input mutated to stay ahead), the attention op must take that input
    as its block_input (so that its memory is not reused before the op has waited for the MLP's reads), and the
    attention op's output must reach the output projection and the MLP join without a copy."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(_chipmunk_latents, make_args, "inductor")
    single = [c for c in codes if "chipmunk_mlp_start" in c]
    assert len(single) == 2, "one compiled single-block graph per input layout"
    for code in single:
        start = re.search(r"chipmunk_mlp_start\.default\((buf\d+),", code)
        normed = start.group(1)
        qkv = re.search(r"extern_kernels\.\w*mm\(.*reinterpret_tensor\(" + normed + r",", code)
        assert qkv and start.start() < qkv.start(), "the MLP starts after the QKV matmul"
        attention = re.search(r"(buf\d+) = torch\.ops\.flux_harness\.chipmunk_attention\.default\(.*, " + normed +
                              r"\)\n", code)
        assert attention, "the attention op does not take the MLP's input as its block_input"
        join = code.index("chipmunk_mlp_join.default(")
        between = code[attention.start():join]
        assert "extern_kernels" in between and not re.search(r"\n\s*\w*(cat|clone)\w*\(", between), between
        # The join reads the attention's output itself: its buffer, or a name inductor binds to it (`bufB = bufA`).
        names = {attention.group(1)} | set(re.findall(r"\n\s*(buf\d+) = " + attention.group(1) + r"\n", between))
        read = re.match(r"chipmunk_mlp_join\.default\(reinterpret_tensor\((buf\d+),", code[join:])
        assert read and read.group(1) in names, code[join:join + 120]

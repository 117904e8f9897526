"""Chipmunk (utils/chipmunk.py): config, token reorder, reference deltas, FLUX mapping, schedule, and the
interval=1 three-way check, on the tiny pipeline with the PyTorch reference (CPU, float32). The Triton
kernels are checked against the reference through Triton's CPU interpreter (small shapes)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from utils import chipmunk
from utils.benchmark_utils import pipeline_call_kwargs
from utils.pipeline_utils import StackError, load_pipeline, optimize, validate_args

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs/chipmunk-tiny.yml")
STEPS = 6  # tiny config, full_step_every 4: attention dense 0,1,4; MLP dense 0,4, reselect 1,3,5


def rel(x, ref):
    return float((x - ref).norm() / ref.norm())


def latents(make_args, *extra, steps=STEPS):
    args = make_args("--disable_bf16", "--num_inference_steps", str(steps), *extra)
    validate_args(args)
    pipe = load_pipeline(args)
    optimize(pipe, args)
    out = pipe(**pipeline_call_kwargs(args), generator=torch.manual_seed(args.seed), output_type="latent").images
    return out, pipe


@pytest.fixture(scope="module")
def dense_latents():
    from conftest import tiny_args

    return latents(tiny_args)[0]


def write_config(tmp_path, **sections):
    cfg = yaml.safe_load(Path(TINY_CONFIG).read_text())
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "chipmunk.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sections, message", [
    ({"mlp": {"top_k": 0.3}}, "unknown key mlp.top_k"),
    ({"attention": {"top_keys": 0.2}}, "unknown section 'attention'"),
    ({"attn": {"top_keys": 0.0}}, "attn.top_keys must be a fraction in (0, 1]"),
    ({"mlp": {"top_keys": 1.5}}, "mlp.top_keys must be a fraction in (0, 1]"),
    ({"mlp": {"top_keys": "dd"}}, "mlp.top_keys must be a fraction in (0, 1]"),
])
def test_bad_config_is_refused_with_the_fix(make_args, tmp_path, sections, message):
    path = write_config(tmp_path, **sections)
    with pytest.raises(StackError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate_args(make_args("--chipmunk_config", path))


def test_image_size_not_tiled_by_patches_is_refused(make_args):
    flux = str(ROOT / "configs/chipmunk-flux.yml")
    with pytest.raises(StackError, match=r"multiples of 128 px; got 1008x1024\. Use e\.g\. --height 896 or 1024"):
        validate_args(make_args("--chipmunk_config", flux, "--height", "1008", "--width", "1024"))
    with pytest.raises(StackError, match="no such file"):
        validate_args(make_args("--chipmunk_config", "nope.yml"))


def test_published_flux_config_values():
    cfg = chipmunk.load_chipmunk_config(ROOT / "configs/chipmunk-flux.yml", height=768, width=1280)
    assert (cfg.mlp.top_keys, cfg.mlp.random_keys, cfg.mlp.full_step_every, cfg.mlp.block_mask_cache) == (0.3, 0.05, 10, 2)
    assert (cfg.attn.top_keys, cfg.attn.full_step_every, cfg.attn.mbm, cfg.mlp.bm) == (0.165, 10, 192, 128)
    assert (cfg.patchify.chunk_size_1, cfg.patchify.chunk_size_2) == (8, 4)
    assert chipmunk.rounded_count(0.165, 512 + 48 * 80, 128) == 768  # keys per query group at 1280x768
    assert chipmunk.rounded_count(0.35, 12288, 256) == 4352  # neurons per token block


# --- token reorder ----------------------------------------------------------------------------------

def test_patch_order_groups_local_tokens_and_is_a_permutation():
    h, w = 8, 16
    perm = chipmunk.patch_order(h, w, 4, 2)
    assert torch.equal(perm.sort().values, torch.arange(h * w))
    rows, cols = perm // w, perm % w
    assert rows[:4].tolist() == [0, 0, 1, 1] and cols[:4].tolist() == [0, 1, 0, 1]  # first 2x2 sub-patch
    assert rows[:16].max() == 3 and cols[:16].max() == 3  # first 4x4 patch before anything else
    assert rows[16:32].tolist() == rows[:16].tolist() and (cols[16:32] - 4).tolist() == cols[:16].tolist()


def test_token_reorder_alone_keeps_the_dense_output(make_args, tmp_path, dense_latents):
    path = write_config(tmp_path, attn={"is_enabled": False}, mlp={"is_enabled": False})
    out, _ = latents(make_args, "--chipmunk_config", path)
    assert rel(out, dense_latents) < 1e-5  # only the attention summation order changes


# --- reference kernels ------------------------------------------------------------------------------

def test_reference_attention_over_all_keys_is_dense_attention_and_delta_restores_it():
    torch.manual_seed(1)
    B, L, H, D, group = 2, 100, 3, 16, 32
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    sums = chipmunk.attention_column_sums(q, k, group)
    assert sums.shape == (B, H, 4, L)
    torch.testing.assert_close(sums.sum(-1)[..., :3], torch.full((B, H, 3), float(group)), rtol=1e-5, atol=1e-4)
    everything = chipmunk.select_key_columns(sums, L)
    torch.testing.assert_close(chipmunk.sparse_attention_reference(q, k, v, everything, group), dense,
                               rtol=1e-5, atol=1e-5)
    some = chipmunk.select_key_columns(sums, 32)
    partial = chipmunk.sparse_attention_reference(q, k, v, some, group)
    assert rel(partial, dense) > 1e-2  # really sparse
    o_cache = chipmunk.sparse_attention_reference(q, k, v, some, group, dense_out=dense)  # a dense step's cache
    torch.testing.assert_close(o_cache, dense - partial, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chipmunk.sparse_attention_reference(q, k, v, some, group, o_cache), dense,
                               rtol=1e-5, atol=1e-5)


def test_reference_mlp_delta_with_all_neurons_tracks_the_dense_mlp():
    torch.manual_seed(2)
    B, L, d, hidden, out, block = 1, 70, 24, 64, 16, 32
    w1, b1, w2 = torch.randn(hidden, d) / d ** 0.5, torch.randn(hidden), torch.randn(out, hidden) / hidden ** 0.5
    x_old, x_new = torch.randn(B, L, d), torch.randn(B, L, d)
    act = F.gelu(F.linear(x_old, w1, b1), approximate="tanh")
    out_cache = F.linear(act, w2).float()
    everything = torch.arange(hidden, dtype=torch.int32).expand(B, 3, hidden).contiguous()
    chipmunk.sparse_mlp_reference(x_new, w1, b1, w2, everything, act, out_cache, block)
    expected_act = F.gelu(F.linear(x_new, w1, b1), approximate="tanh")
    torch.testing.assert_close(act, expected_act, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cache, F.linear(expected_act, w2), rtol=1e-5, atol=1e-5)


def test_dense_fc1_writes_the_neuron_major_cache_in_place():
    from utils.flux_builders import build_tiny_pipeline
    from utils.step_clock import StepClock

    torch.manual_seed(4)
    B, L, d, hidden, block = 1, 96, 24, 64, 32  # whole blocks, as FLUX's sizes (a partial one is padded: a copy)
    # Parameters, as the model's: their requires_grad once made matmul copy its transposed result.
    w1, b1 = torch.nn.Parameter(torch.randn(hidden, d) / d ** 0.5), torch.nn.Parameter(torch.randn(hidden))
    layer = chipmunk.SparseMlpLayer(0, StepClock(build_tiny_pipeline().scheduler), chipmunk.MlpConfig(bm=block),
                                    w1, b1, torch.randn(16, hidden), None)
    layer.state.begin(((B, L, d), torch.float32, "cpu"))
    addresses = []
    for x in (torch.randn(B, L, d), torch.randn(B, L, d)):  # the first call makes the cache, the second reuses it
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            act, pre_mean = layer._dense_fc1(x)
        copies = [e.input_shapes for e in prof.events() if e.name in ("aten::copy_", "aten::clone")
                  and any(math.prod(shape) >= L * hidden for shape in e.input_shapes if shape)]
        assert not copies, copies  # the cache is written by GELU, not by a transposing copy
        pre = F.linear(x, w1, b1)
        torch.testing.assert_close(act, F.gelu(pre, approximate="tanh"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pre_mean, chipmunk.block_means(pre, block), rtol=1e-5, atol=1e-5)
        assert act.transpose(1, 2).is_contiguous()  # neuron-major storage, as the sparse kernels read it
        assert act is layer.state.tensors["act_cache"]
        addresses.append(act.data_ptr())
    assert addresses[0] == addresses[1]  # written in place: a step graph holds the buffer's address


def test_layer_state_buffers_are_written_in_place_and_never_handed_out():
    """store copies on first use (a cache never aliases the value it was given, which the caller may hand out: a
    dense MLP step returns fc2's output and caches it in float32) and writes in place afterwards; buffer() finds
    a cache only with the shape and dtype asked for."""
    from utils.flux_builders import build_tiny_pipeline
    from utils.step_clock import StepClock

    state = chipmunk.LayerState("test", 0, StepClock(build_tiny_pipeline().scheduler))
    state.begin(((2, 3), torch.float32, "cpu"))
    first, second = torch.randn(2, 3), torch.randn(2, 3)
    cache = state.store("out_cache", first)
    assert cache.data_ptr() != first.data_ptr() and torch.equal(cache, first)
    assert state.store("out_cache", second).data_ptr() == cache.data_ptr() and torch.equal(cache, second)
    assert state.buffer("out_cache", torch.Size([2, 3]), torch.float32) is cache
    assert state.buffer("out_cache", torch.Size([3, 2]), torch.float32) is None
    assert state.buffer("out_cache", torch.Size([2, 3]), torch.bfloat16) is None
    assert state.buffer("o_cache", torch.Size([2, 3]), torch.float32) is None


def test_selected_index_sets_come_out_ascending_as_a_sort_would_give_them():
    torch.manual_seed(11)
    for shape, size, count in (((2, 3, 5), 100, 17), ((1, 4, 6), 4608, 768), ((1, 34), 12288, 4300)):
        scores = torch.randn(*shape, size)
        expected = scores.topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
        assert torch.equal(chipmunk.top_ascending(scores, count), expected)
        assert torch.equal(chipmunk.select_key_columns(scores, count), expected)


def test_neuron_sets_ranked_by_change_from_a_reference_into_a_buffer():
    """The layers' reselection call: bf16 pre-activation means ranked by |now - reference| in float32, written into
    the layer's index buffer, as ranking the change computed beforehand gives them."""
    torch.manual_seed(12)
    now, reference = torch.randn(1, 3, 500).bfloat16(), torch.randn(1, 3, 500)
    change = (now.float() - reference).abs()
    buffer = torch.full((1, 3, 120), -1, dtype=torch.int32)
    got = chipmunk.top_and_random(now, 100, 120, 1_000_007, reference=reference, out=buffer)
    expected = chipmunk.top_and_random(change, 100, 120, 1_000_007)
    assert got is buffer and torch.equal(got, expected)
    top = change.topk(100, dim=-1).indices
    assert bool(torch.isin(top[0, 0], got[0, 0]).all())  # the 100 largest changes are in, plus 20 others


def test_block_means_of_partial_and_whole_blocks():
    torch.manual_seed(12)
    x = torch.randn(2, 300, 8)
    assert chipmunk.block_sizes(300, 128, "cpu").tolist() == [128.0, 128.0, 44.0]
    expected = torch.stack([x[:, start:start + 128].mean(1) for start in range(0, 300, 128)], 1)
    torch.testing.assert_close(chipmunk.block_means(x, 128), expected, rtol=1e-6, atol=1e-6)
    whole = torch.randn(2, 256, 5, dtype=torch.bfloat16)  # whole blocks, bf16: summed in float32, no padding copy
    expected = whole.float().view(2, 2, 128, 5).mean(2)
    got = chipmunk.block_means(whole, 128)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_single_block_proj_out_adds_linear2_bias_once():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    from utils.step_clock import StepClock
    from utils.flux_builders import build_tiny_pipeline

    torch.manual_seed(3)
    block = FluxSingleTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16)
    torch.nn.init.normal_(block.proj_out.bias, std=1.0)  # a bias large enough to see twice
    attn_out, x = torch.randn(1, 40, 32), torch.randn(1, 40, 32)
    expected = block.proj_out(torch.cat([attn_out, block.act_mlp(block.proj_mlp(x))], dim=2))
    clock = StepClock(build_tiny_pipeline().scheduler)  # step_index None: the first step, dense
    split = chipmunk.ChipmunkSingleProjOut(block.proj_out, block.proj_mlp, 7, clock, chipmunk.MlpConfig(bm=16))
    torch.testing.assert_close(split(torch.cat([attn_out, x], dim=2)), expected, rtol=1e-5, atol=1e-5)
    # The attention-output half is an nn.Linear, so the float8 layer quantizes it like the other projections.
    assert [name for name, m in split.named_modules() if isinstance(m, torch.nn.Linear)] == ["attn_out"]


# --- the layer in the pipeline ----------------------------------------------------------------------

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


def _callers() -> set[str]:
    frame, names = sys._getframe(2), set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names


def test_single_blocks_run_their_mlp_beside_the_attention_with_the_same_latents(make_args, monkeypatch):
    """A single block's MLP input is its attention's input. By default (CHIPMUNK_MLP_AHEAD=1) its whole MLP step starts
    in the attention processor before the projections (a side stream on a GPU; in place on CPU, and in the first
    generation before its kernels have run) and its input no longer travels through the block's concat (NoColumns);
    proj_out joins it. With =0 the MLP runs in proj_out's call and only its neuron selection starts beside the
    attention (in the attention op); with no attention beside, everything happens in the MLP's call. The double
    blocks' image MLPs always run in their own call. Latents equal bit for bit in all three."""
    reselects, ahead_steps = [], []
    reselect, run_ahead = chipmunk.SparseMlpLayer._reselect, chipmunk.SparseMlpLayer._run_ahead

    def spy_reselect(self, means, step, hidden):
        reselects.append((self.state.index, step, "select_ahead" in _callers()))
        return reselect(self, means, step, hidden)

    def spy_ahead(self, x, step, last, beside):
        ahead_steps.append((self.state.index, step, beside))
        return run_ahead(self, x, step, last, beside)

    monkeypatch.setattr(chipmunk.SparseMlpLayer, "_reselect", spy_reselect)
    monkeypatch.setattr(chipmunk.SparseMlpLayer, "_run_ahead", spy_ahead)
    assert chipmunk.MLP_AHEAD  # the default (CHIPMUNK_MLP_AHEAD=1)
    ahead, pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG)
    doubles = len(pipe.transformer.transformer_blocks)
    assert 1 <= doubles < 5, doubles  # both kinds of block are sparse in the tiny model
    singles = range(doubles, 6)
    assert all(isinstance(b.proj_mlp, chipmunk.NoColumns) for b in pipe.transformer.single_transformer_blocks)
    where = {(index, step): beside for index, step, beside in reselects}
    assert len(where) == len(reselects) == 5 * 3  # layers 1..5, reselecting at steps 1, 3, 5, once each
    assert all(beside == (index >= doubles) for (index, _), beside in where.items()), where
    # Every step of every single block's MLP starts ahead: in place until its sparse kernels have run (steps 0 and 1,
    # whose sparse step tunes them), beside the attention from step 2 (the dense step 4 included).
    assert sorted(ahead_steps, key=lambda a: a[1::-1]) == [(i, t, t >= 2) for t in range(STEPS) for i in singles]

    def generate():
        reselects.clear(), ahead_steps.clear()
        return pipe(**pipeline_call_kwargs(make_args("--num_inference_steps", str(STEPS))),
                    generator=torch.manual_seed(make_args().seed), output_type="latent").images

    assert torch.equal(generate(), ahead)  # a second generation: every step beside the attention
    assert sorted(ahead_steps) == [(i, t, True) for i in singles for t in range(STEPS)]

    monkeypatch.setattr(chipmunk, "MLP_AHEAD", False)  # CHIPMUNK_MLP_AHEAD=0, read when Chipmunk is applied
    reselects.clear(), ahead_steps.clear()
    selected_ahead, pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG)
    assert all(isinstance(b.proj_mlp, chipmunk.PassThrough) for b in pipe.transformer.single_transformer_blocks)
    assert torch.equal(ahead, selected_ahead)
    assert not ahead_steps and all(beside == (index >= doubles) for index, _, beside in reselects)
    for layer in pipe.transformer.chipmunk_layers:
        if isinstance(layer, chipmunk.SparseAttentionLayer):
            assert (layer.mlp_beside is not None) == (layer.state.index >= doubles)
            layer.mlp_beside = None
    inline = generate()
    assert not any(beside for *_, beside in reselects) and not ahead_steps
    assert torch.equal(ahead, inline)


def test_a_single_blocks_proj_out_alone_is_refused_when_its_mlp_starts_in_the_attention(make_args):
    """proj_out of a block whose MLP starts in its attention processor has no MLP input: called without the attention
    having run this step, it says so instead of computing an MLP from the attention output."""
    _, pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG, steps=2)
    proj_out = pipe.transformer.single_transformer_blocks[0].proj_out
    with pytest.raises(RuntimeError, match="starts in its block's attention processor, which did not run"):
        proj_out(torch.randn(1, 8, proj_out.dim))


def test_deferred_dense_rule():
    due = chipmunk.due_since
    dense = lambda t: chipmunk.attn_dense_step(t, chipmunk.AttnConfig(full_step_every=10))  # noqa: E731
    assert due(None, 5, dense)  # nothing cached yet
    assert [due(t - 1, t, dense) for t in range(12)] == [t in (0, 1, 10) for t in range(12)]  # every step computed
    assert due(8, 15, dense) and not due(15, 19, dense) and due(15, 22, dense)  # 10 -> 15, 20 -> 22


def test_hicache_interval3_on_chipmunk_defers_refreshes_and_gives_an_image(make_args):
    chip, _ = latents(make_args, "--chipmunk_config", TINY_CONFIG, steps=10)
    both, pipe = latents(make_args, "--chipmunk_config", TINY_CONFIG, "--cache_mode", "hicache", "--interval", "3",
                         steps=10)
    # full steps 0,1,2,5,8; attention dense on 0,1,4->5,8; MLP dense on 0,4->5,8, reselect on 1
    stats = chipmunk.chipmunk_stats(pipe)
    assert stats["attention layer 3"] == {"dense": 4, "sparse": 1, "reselect": 0}
    assert stats["MLP layer 3"] == {"dense": 3, "sparse": 2, "reselect": 1}
    assert torch.isfinite(both).all() and rel(both, chip) < 0.05  # an image near Chipmunk's, not noise


def test_interval1_three_way_check(make_args):
    from utils.interval1_check import run_interval1_check

    rows, passed = run_interval1_check(make_args("--disable_bf16", "--num_inference_steps", str(STEPS),
                                                 "--chipmunk_config", TINY_CONFIG), tolerance=1e-6)
    by_pair = {r["pair"]: r for r in rows}
    assert by_pair["B vs A"]["bitwise_equal"], by_pair["B vs A"]
    assert by_pair["D vs C"]["rel_error"] <= 1e-6, by_pair["D vs C"]
    assert by_pair["D vs B"]["rel_error"] > 1e-4  # Chipmunk really changed something
    assert passed


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
    guard (the layer id as a Python int did this) passes dynamo's recompile limit and fullgraph fails."""
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    eager = _chipmunk_latents(make_args)
    assert torch.isfinite(eager).all()
    torch._dynamo.reset()  # graphs other tests left on the same block code would be reused, not counted
    torch.testing.assert_close(_chipmunk_latents(make_args, counting_aot_eager), eager, rtol=0, atol=1e-6)
    # 2 double-block graphs (block 0 keeps its dense FeedForward: first_n_dense_layers 1) + 2 single-block graphs
    # (the first single block's input is contiguous, the later ones get a view of the joint sequence): 2 + 4
    # Chipmunk layers would give 6 with per-layer guards.
    assert len(graphs) == 4



def test_a_single_blocks_compiled_code_starts_its_mlp_before_the_qkv_matmul_and_copies_nothing(make_args):
    """Read inductor's code for a single block (CPU code; the scheduling is inductor's, not the backend's). The MLP's
    start op must come before the QKV matmul that reads the same normalised input (inductor moved a pure op down to
    the attention op), and the attention op's output must reach the output projection and the MLP join without a
    copy: before NoColumns, a concat copy kernel and a clone of its MLP half sat between them."""
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(_chipmunk_latents, make_args, "inductor")
    single = [c for c in codes if "chipmunk_mlp_start" in c]
    assert single, "no compiled code starts a single block's MLP"
    for code in single:
        start = re.search(r"chipmunk_mlp_start\.default\((buf\d+),", code)
        qkv = re.search(r"extern_kernels\.\w*mm\(.*reinterpret_tensor\(" + start.group(1) + r",", code)
        assert qkv and start.start() < qkv.start(), "the MLP starts after the QKV matmul"
        attention, join = code.index("chipmunk_attention.default("), code.index("chipmunk_mlp.default(")
        between = code[attention:join]
        assert "extern_kernels" in between and not re.search(r"\n\s*\w*(cat|clone)\w*\(", between), between


# --- Triton kernels, through the CPU interpreter ------------------------------------------------------

KERNEL_CHECK = r"""
import itertools
import torch
from utils import chipmunk as C, chipmunk_triton as T
assert T.TRITON_AVAILABLE, T.UNAVAILABLE_REASON
torch.manual_seed(4)
B, L, H, D, group = 1, 80, 2, 16, 32
q, k, v, o_cache = (torch.randn(B, L, H, D) for _ in range(4))
sums = C.attention_column_sums(q, k, group)
torch.testing.assert_close(T.attention_column_sums(q, k, group), sums, rtol=1e-5, atol=1e-5)
# With the rows' log-sum-exp handed in (natural log, (B, H, L), as FA3 returns it) the first pass is skipped.
lse = torch.logsumexp(torch.einsum("blhd,bmhd->bhlm", q, k) * D ** -0.5, dim=-1)
torch.testing.assert_close(T.attention_column_sums(q, k, group, lse), sums, rtol=1e-5, atol=1e-5)
# A program walks GROUPS_PER_PROGRAM (2 interpreted) consecutive groups: 7 groups of 16 rows over 100 queries leave the
# last program one group, itself ragged (4 rows); 70 keys end in a partial key tile; q and k are views with strides.
qk2 = torch.randn(2, 100, 2, 3, 32)
q2, k2 = qk2[:, :, 0], qk2[:, :70, 1]
torch.testing.assert_close(T.attention_column_sums(q2, k2, 16), C.attention_column_sums(q2, k2, 16),
                           rtol=1e-5, atol=1e-6)
# The once-per-process check before trusting a kernel's log-sum-exp: right units pass, log2 units or a layout
# transposed to (B, L, H) do not.
assert C.attention_lse_matches(q, k, lse, T)
assert not C.attention_lse_matches(q, k, lse * 1.4426950408889634, T)
assert not C.attention_lse_matches(q, k, lse.transpose(1, 2), T)
index = C.select_key_columns(sums, 24)
for cache in (None, o_cache):
    torch.testing.assert_close(T.sparse_attention(q, k, v, index, group, cache),
                               C.sparse_attention_reference(q, k, v, index, group, cache), rtol=1e-5, atol=1e-5)
# A dense step's o_cache = O_dense - A_S in one pass, also written in place over the buffer it reads (the layer's
# o_cache buffer holds the last dense step's values then).
dense_out = torch.randn_like(q)
expected = C.sparse_attention_reference(q, k, v, index, group, dense_out=dense_out)
torch.testing.assert_close(T.sparse_attention(q, k, v, index, group, dense_out=dense_out), expected,
                           rtol=1e-5, atol=1e-5)
buffer = torch.randn_like(q)
assert T.sparse_attention(q, k, v, index, group, dense_out=dense_out, out=buffer) is buffer
torch.testing.assert_close(buffer, expected, rtol=1e-5, atol=1e-5)
in_place = dense_out.clone()
T.sparse_attention(q, k, v, index, group, o_cache=in_place, out=in_place)
torch.testing.assert_close(in_place, C.sparse_attention_reference(q, k, v, index, group, dense_out), rtol=1e-5,
                           atol=1e-5)
# A 48-row group spans a 32-row and a 16-row tile (the last group partial). 24 keys: a masked last key tile; 32:
# unmasked tiles.
sums48 = C.attention_column_sums(q, k, 48)
for keys in (24, 32):
    index48 = C.select_key_columns(sums48, keys)
    for cache in (None, o_cache):
        torch.testing.assert_close(T.sparse_attention(q, k, v, index48, 48, cache),
                                   C.sparse_attention_reference(q, k, v, index48, 48, cache), rtol=1e-5, atol=1e-5)
# Top-k selection with ascending indices in one kernel: as torch.topk + sort; ties go to the lower index.
for shape, count in (((2, 3, 300), 40), ((1, 4608), 768), ((4, 12288), 4352)):
    scores = torch.randn(*shape)
    assert torch.equal(T.top_ascending(scores, count), scores.topk(count, -1).indices.sort(-1).values.int())
ties = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [-1.0, -0.5, 0.0, -2.0, 5.0, -0.25]])
assert T.top_ascending(ties, 2).tolist() == [[1, 2], [2, 4]]
# A neuron set with its random keys in one kernel: the same as the two launches it replaces (hashed noise over the
# rest, the top set scored 2.0), for int seeds (one whose hash offset fits int32: 0) and a seed in a tensor.
for shape, top, total in (((1, 3, 300), 60, 90), ((2, 12288), 3686, 4352)):
    change = torch.randn(*shape)
    for seed in (1_000_007, 0):
        noise = C.hashed_uniform(shape, seed, "cpu")
        expected = T.top_ascending(noise.scatter_(-1, T.top_ascending(change, top).long(), 2.0), total)
        for given in (seed, torch.tensor(seed)):
            got = T.top_and_random(change, top, total, given)
            assert torch.equal(got, expected), (shape, seed, (got != expected).sum())
    # The layers' call: bf16 scores ranked by their change from a float32 reference, computed in the kernel, into a
    # given buffer; as the reference path ranks (scores.float() - reference).abs().
    now, reference = torch.randn(*shape).bfloat16(), torch.randn(*shape)
    buffer = torch.full((*shape[:-1], total), -1, dtype=torch.int32)
    got = T.top_and_random(now, top, total, 1_000_007, reference=reference, out=buffer)
    assert got is buffer and torch.equal(got, T.top_and_random((now.float() - reference).abs(), top, total, 1_000_007))
# The MLP kernels' loops drop their load masks when every tile is full (16 wide, interpreted): (inputs, outputs,
# neurons) = (32, 24, 20) takes fc1's unmasked loop and fc2's fully masked one, (24, 32, 32) the other two, and
# (32, 32, 20), (32, 24, 32) fc2's loads masked along one dim. 80 tokens in blocks of 32: a partial last row tile.
# The activation cache in either layout (the kernel takes any strides).
hidden, block = 64, 32
shapes = ((32, 24, 20), (24, 32, 32), (32, 32, 20), (32, 24, 32))
for (d, out, K), layout in itertools.product(shapes, (lambda t: t, C.neuron_major)):
    x, w1, b1 = torch.randn(B, L, d), torch.randn(hidden, d) / d ** 0.5, torch.randn(hidden)
    w2 = torch.randn(out, hidden) / 8
    index = torch.stack([torch.randperm(hidden)[:K].sort().values for _ in range(3)])[None].int()
    act, out_cache = layout(torch.randn(B, L, hidden)), torch.randn(B, L, out)
    act_ref, out_ref, act_before, out_before = act.clone(), out_cache.clone(), act.clone(), out_cache.clone()
    pre = C.sparse_mlp_reference(x, w1, b1, w2, index, act_ref, out_ref, block)
    low = torch.full((B, L, out), float("nan"), dtype=torch.bfloat16)
    means = T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, act, out_cache, block, out=low)
    torch.testing.assert_close(act, act_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cache, out_ref, rtol=1e-5, atol=1e-5)
    # fc2's epilogue: the updated cache, rounded once. Within one bf16 step: the interpreter truncates where the GPU
    # (cvt.rn) and torch round to nearest.
    torch.testing.assert_close(low.float(), out_cache.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)
    assert not torch.equal(act, act_before) and act.stride() == act_before.stride()  # updated in place, same layout
    rows = (torch.arange(3 * block) < L).view(3, block)
    torch.testing.assert_close(means, (pre * rows[None, :, :, None]).sum(2) / rows.sum(1)[None, :, None], rtol=1e-5, atol=1e-5)
    # Given the layer's reference pre-activations (B, nb, hidden), the delta kernel writes the means into their
    # neurons' places, as the scatter it replaces, bit for bit; the caches' update is unchanged.
    pre_mean, a2, o2 = torch.randn(B, 3, hidden), act_before.clone(), out_before.clone()
    expected = pre_mean.clone().scatter_(2, index.long(), means)
    assert T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, a2, o2, block, pre_mean=pre_mean) is None
    assert torch.equal(pre_mean, expected) and torch.equal(a2, act) and torch.equal(o2, out_cache)
# fc2's epilogue in column chunks (the interpreted config above: 16-wide tiles in 4 chunks of 4) at the GPU's tiles,
# 128x256 and 128x128 in chunks of 64 (here 32-row tiles): the float32 cache and its bf16 copy bit for bit as one
# whole-tile update gives them, and as the reference. 300 outputs leave a partial last tile (masked chunks, one of
# them wholly past the end), 256 none; 20 neurons take the masked K loop, 32 the unmasked one.
for nout, K, (tile, chunk) in itertools.product((300, 256), (20, 32), ((256, 64), (128, 64))):
    delta, w2_t = torch.randn(B, L, K), torch.randn(hidden, nout) / 8
    index = torch.stack([torch.randperm(hidden)[:K].sort().values for _ in range(3)])[None].int()
    cache = torch.randn(B, L, nout)
    expected = cache + torch.einsum("blk,blkn->bln", delta, w2_t[index[0, torch.arange(L) // block].long()][None])
    results = []
    for epilogue_n in (tile, chunk):
        out_cache, low = cache.clone(), torch.full((B, L, nout), float("nan"), dtype=torch.bfloat16)
        T._sparse_fc2_kernel.fn[(T.triton.cdiv(L, 32), T.triton.cdiv(nout, tile), B)](
            delta, w2_t, index, out_cache, low, delta.stride(0), delta.stride(1), out_cache.stride(0),
            out_cache.stride(1), low.stride(0), low.stride(1), L, K, nout, 3, block, WRITE_LOW=True, BLOCK_M=32,
            BLOCK_N=tile, BLOCK_K=16, EPILOGUE_N=epilogue_n, EVEN_K=K % 16 == 0, EVEN_N=nout % tile == 0,
            num_warps=4, num_stages=1)
        results.append((out_cache, low))
    (whole, whole_low), (chunked, chunked_low) = results
    assert torch.equal(chunked, whole) and torch.equal(chunked_low, whole_low), (nout, K, tile)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_low.float(), chunked.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)
# A dense MLP step's epilogue over W1 x^T: bias, GELU into the neuron-major cache, block means (blocks of 32 and of
# 24, a size that is no power of two; 80 tokens leave a partial last block).
for block in (32, 24):
    pre_t, b1 = torch.randn(2, 40, 80), torch.randn(40)
    act_t = torch.full_like(pre_t, float("nan"))
    means = T.dense_mlp_epilogue(pre_t, b1, act_t, block)
    biased = (pre_t + b1[:, None]).transpose(1, 2)
    torch.testing.assert_close(act_t.transpose(1, 2), C.gelu_tanh(biased), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means, C.block_means(biased, block), rtol=1e-5, atol=1e-6)
print("kernels match the reference")
"""


# The searches for the K-th largest key (bitwise, radix) against each other and the PyTorch reference: random
# rows, rows of few values (many ties, -0.0 and +0.0 among them), short odd rows (padding lanes), K = 1 and K = N, and
# random bit patterns (every int32 key, NaNs too). torch.topk breaks ties its own way, so tied rows are checked against
# the kernels' rule (a stable sort of the order-preserving keys: ties to the lower index, -0.0 below +0.0) and, for
# the selected values, against the reference.
SELECTION_CHECK = r"""
import torch
from utils import chipmunk as C, chipmunk_triton as T
assert T.TRITON_AVAILABLE, T.UNAVAILABLE_REASON
torch.manual_seed(5)

def key_order_top(x, count):
    bits = x.view(torch.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # as the kernels' _float_key
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :count].sort(-1).values.int()

def both(fn, *args):  # every search, and the default (the autotuner's pick on a GPU)
    bitwise = fn(*args, search="bitwise")
    for search in (*T.SELECTION_SEARCHES, None):
        got = fn(*args, search=search)
        assert torch.equal(got, bitwise), (fn.__name__, search, args[1:], (got != bitwise).sum())
    return bitwise

seed = 1_000_007
few_levels = lambda *shape: (torch.randn(*shape) * 2).round()  # ~9 values per row, -0.0 among them
bit_patterns = torch.randint(-2**31, 2**31, (2, 777), dtype=torch.int32)
bit_patterns[0, :4] = torch.tensor([-2**31, 2**31 - 1, 0, -1], dtype=torch.int32)  # -0.0, +0.0, the extreme keys
for scores, counts in ((torch.randn(2, 12288), (4352,)), (few_levels(2, 12288), (1, 4352, 12288)),
                       (few_levels(3, 37), (1, 5, 37)), (torch.randn(2, 1), (1,)),
                       (bit_patterns.view(torch.float32), (1, 300, 777))):
    ties = scores.unique().numel() < scores.numel()
    for count in counts:
        got = both(T.top_ascending, scores, count)
        assert torch.equal(got, key_order_top(scores, count)), (scores.shape, count)
        if not ties:
            assert torch.equal(got, C.top_ascending(scores, count))
        elif not scores.isnan().any():
            assert torch.equal(scores.gather(-1, got.long()).sort(-1).values,
                               scores.gather(-1, C.top_ascending(scores, count).long()).sort(-1).values)
    for top, total in {(counts[0], counts[-1]), (counts[-1], counts[-1]), (max(1, counts[0] * 3 // 4), counts[0])}:
        got = both(T.top_and_random, scores, top, total, seed)
        noise = C.hashed_uniform(scores.shape, seed, "cpu")
        assert torch.equal(got, key_order_top(noise.scatter_(-1, key_order_top(scores, top).long(), 2.0), total))
        if not ties:
            assert torch.equal(got, C.top_and_random(scores, top, total, seed))
print("selection searches agree")
"""

# sparse_mlp(tma=True) (the layers' path on Hopper: fc1's X and fc2's deltas through TMA descriptors over
# (B * L, width) views) against the pointer kernels (tma=False) and the reference. Batch size 2 and 80 tokens in
# blocks of 32: the last row tile is partial, so batch 0's last tile reads batch 1's first rows through the view and
# batch 1's reads past the end (zeros); stores of those rows would land in batch 1's rows of the caches. (32, 24, 18): 18 float32 deltas are 72 bytes, so the
# deltas' rows are padded to 16 bytes; fc2's loop masked. (24, 32, 32): a partial DM tile (zero columns from TMA).
# A batch-strided x (a view) is copied into the (B * L, DM) layout. Wrapped so that a failure here reports itself
# without failing the checks of the other kernels (the same interpreter run).
TMA_CHECK = r"""
import traceback

def check_tma():
    torch.manual_seed(6)
    B, L, hidden, block = 2, 80, 64, 32
    for (d, out, K), strided in (((32, 24, 18), False), ((24, 32, 32), True)):
        x = torch.randn(B, L + 3, d)[:, :L] if strided else torch.randn(B, L, d)
        w1, b1, w2 = torch.randn(hidden, d) / d ** 0.5, torch.randn(hidden), torch.randn(out, hidden) / 8
        index = torch.stack([torch.stack([torch.randperm(hidden)[:K].sort().values for _ in range(3)])
                             for _ in range(B)]).int()
        act, out_cache = C.neuron_major(torch.randn(B, L, hidden)), torch.randn(B, L, out)
        results = {}
        for tma in (False, True):
            for fused in (False, True):
                a, o = act.clone(), out_cache.clone()
                low = torch.full((B, L, out), float("nan"), dtype=torch.bfloat16)
                results[tma, fused] = (a, o, low, T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, a, o, block,
                                                               out=low, tma=tma, fused_delta=fused))
            # fc1's epilogue doing the activation delta: the same update, bit for bit
            assert all(torch.equal(f, u) for f, u in zip(results[tma, True], results[tma, False])), (tma, d, out, K)
            results[tma] = results[tma, False]
        act_ref, out_ref = act.clone(), out_cache.clone()
        pre = C.sparse_mlp_reference(x, w1, b1, w2, index, act_ref, out_ref, block)
        rows = (torch.arange(3 * block) < L).view(3, block)
        means_ref = (pre * rows[None, :, :, None]).sum(2) / rows.sum(1)[None, :, None]
        for got, expected in zip(results[True], results[False]):  # the same tiles and sums
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        a, o, low, means = results[True]
        torch.testing.assert_close(a, act_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(low.float(), o.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)  # as above
        torch.testing.assert_close(means, means_ref, rtol=1e-5, atol=1e-5)
        # The means written into the layer's reference pre-activations, by the delta kernel or (fused) a scatter.
        for tma, fused in itertools.product((False, True), (False, True)):
            pre_mean = torch.randn(B, 3, hidden)
            expected = pre_mean.clone().scatter_(2, index.long(), results[tma, fused][3])
            T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, act.clone(), out_cache.clone(), block, tma=tma,
                         fused_delta=fused, pre_mean=pre_mean)
            assert torch.equal(pre_mean, expected), (tma, fused)

try:
    check_tma()
    print("TMA kernels match")
except Exception:
    print("TMA kernels failed:\n" + traceback.format_exc())
"""

LAYER_CHECK = r"""
import os, tempfile
import torch, yaml
from utils import chipmunk as C, chipmunk_triton as T
from utils.benchmark_utils import create_parser, pipeline_call_kwargs, resolved_defaults
from utils.pipeline_utils import load_pipeline
assert T.TRITON_AVAILABLE, T.UNAVAILABLE_REASON

def parse(*flags):
    return resolved_defaults(create_parser().parse_args(["--ckpt", "tiny", "--device", "cpu", "--disable_bf16", *flags]))

config = yaml.safe_load(open("configs/chipmunk-tiny.yml"))
config["attn"]["mbm"] = 48  # three 16-row tiles per query group, as FLUX's 192 = three 64-row tiles
config["attn"]["recompute_mask"] = False  # column sums once per layer: ~6 s a call interpreted (KERNEL_CHECK checks them)
path = os.path.join(tempfile.mkdtemp(), "chipmunk.yml")
with open(path, "w") as f:
    yaml.safe_dump(config, f)
latents = {}
for backend in ("reference", "triton"):
    os.environ["CHIPMUNK_BACKEND"] = backend
    args = parse("--chipmunk_config", path)
    pipe = load_pipeline(args)
    status = C.apply_chipmunk(pipe, args)
    assert ("Triton kernels" in status) == (backend == "triton"), status
    latents[backend] = pipe(**pipeline_call_kwargs(parse("--num_inference_steps", "5")),
                            generator=torch.manual_seed(0), output_type="latent").images
    stats = C.chipmunk_stats(pipe)
    assert all(v["sparse"] and v["dense"] for v in stats.values()), stats  # both paths of every layer ran
assert torch.isfinite(latents["triton"]).all()
torch.testing.assert_close(latents["triton"], latents["reference"], rtol=1e-4, atol=1e-4)
print("layers match")
"""


def run_interpreted(script: str, timeout: int) -> str:
    """`script` in a fresh interpreter with TRITON_INTERPRET=1 (it must be set before Triton is imported); its stdout."""
    pytest.importorskip("triton", reason="Triton comes with the CUDA build of torch that requirements.txt installs")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_chipmunk_layers_on_the_triton_path_match_the_reference_path():
    """The whole tiny pipeline with the layers calling the (interpreted) kernels, against the reference path: the
    layers' kernel-side state (neuron-major activation cache, W2^T copy, multi-tile query groups) is exercised."""
    assert "layers match" in run_interpreted(LAYER_CHECK, timeout=600)


@pytest.fixture(scope="module")
def kernel_checks_output():
    """KERNEL_CHECK, SELECTION_CHECK and TMA_CHECK in one interpreter: importing utils.chipmunk (diffusers) alone takes
    ~12 s."""
    return run_interpreted(KERNEL_CHECK + SELECTION_CHECK + TMA_CHECK, timeout=150)


def test_triton_kernels_match_the_reference_in_the_interpreter(kernel_checks_output):
    assert "kernels match the reference" in kernel_checks_output


def test_every_selection_search_gives_the_same_indices_as_the_reference(kernel_checks_output):
    assert "selection searches agree" in kernel_checks_output


def test_sparse_mlp_tma_kernels_match_the_pointer_kernels_and_the_reference(kernel_checks_output):
    assert "TMA kernels match" in kernel_checks_output, kernel_checks_output[-3000:]


def test_the_tma_kernels_are_the_default_only_where_tma_exists():
    """sparse_mlp(tma=None), the layers' call, takes the TMA kernels on Hopper only: never for CPU tensors (the
    interpreter tests both paths explicitly). The decision needs no Triton, so this runs everywhere."""
    from utils import chipmunk_triton as T

    assert T.tma_by_default(torch.randn(2, 64, 32)) is False


def test_a_misspelt_mlp_ahead_setting_is_refused_at_import():
    result = subprocess.run([sys.executable, "-c", "import utils.chipmunk"], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, CHIPMUNK_MLP_AHEAD="yes"))
    assert result.returncode != 0 and "CHIPMUNK_MLP_AHEAD='yes': one of 1 (default), 0" in result.stderr

"""Chipmunk's sparse layers (utils/chipmunk/layers.py) on the PyTorch reference path, called directly with a clock
whose step the test sets: caches written in place and never handed out, the dense step's fc1 written into the
neuron-major cache, the neuron selection into its buffer, a new input shape dropping the caches, a second call at
one step refused, dense and sparse steps against dense computations, the custom ops taking the layer itself, and
the dense attention's log-sum-exp check."""

import math
import types

import pytest
import torch
import torch.nn.functional as F

from chipmunk_support import ManualClock
from utils.chipmunk import layers
from utils.chipmunk import reference as R
from utils.chipmunk.config import AttnConfig, MlpConfig

HIDDEN, D_MODEL, OUT = 64, 24, 16


def _mlp(clock, with_bias=True, **config):
    torch.manual_seed(7)
    w1, b1 = torch.randn(HIDDEN, D_MODEL) / D_MODEL ** 0.5, torch.randn(HIDDEN)
    w2, b2 = torch.randn(OUT, HIDDEN) / HIDDEN ** 0.5, torch.randn(OUT)
    config = dict(dict(bm=32, counts_multiple_of=16, full_step_every=4), **config)
    return layers.SparseMlp(3, clock, MlpConfig(**config), w1, b1, w2, b2 if with_bias else None, None)


def _dense_mlp(layer, x):
    return F.linear(R.gelu_tanh(F.linear(x, layer.w1, layer.b1)), layer.w2, layer.b2)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _attention(clock, **config):
    config = dict(dict(mbm=32, counts_multiple_of=16, full_step_every=4), **config)
    dense = layers.DenseAttention(lambda q, k, v: _sdpa(q, k, v).contiguous(), with_lse=False)
    return layers.SparseAttention(2, clock, AttnConfig(**config), dense, None)


def _caches(layer):
    return {name: getattr(layer, name) for name in layer.CACHES}


# --- caches ----------------------------------------------------------------------------------------

def test_layer_caches_are_written_in_place_and_never_handed_out():
    """write() copies on first use (a cache never aliases the value it was given, which the caller may hand out: a
    dense MLP step returns fc2's output and caches it in float32) and writes in place afterwards; buffer() finds
    a cache only with the shape and dtype asked for."""
    layer = _mlp(ManualClock())
    assert _caches(layer) == {"act_cache": None, "out_cache": None, "pre_mean": None, "neuron_index": None}
    first, second = torch.randn(2, 3), torch.randn(2, 3)
    cache = layer.write("out_cache", first)
    assert cache is layer.out_cache and cache.data_ptr() != first.data_ptr() and torch.equal(cache, first)
    assert layer.write("out_cache", second).data_ptr() == cache.data_ptr() and torch.equal(cache, second)
    assert layer.out_cache is cache
    low = torch.randn(2, 3, dtype=torch.bfloat16)  # converted to the cache's dtype in the same pass
    assert layer.write("out_cache", low, dtype=torch.float32) is cache and torch.equal(cache, low.float())
    assert layer.buffer("out_cache", torch.Size([2, 3]), torch.float32) is cache
    assert layer.buffer("out_cache", torch.Size([3, 2]), torch.float32) is None
    assert layer.buffer("out_cache", torch.Size([2, 3]), torch.bfloat16) is None
    assert layer.buffer("pre_mean", torch.Size([2, 3]), torch.float32) is None
    halved = layer.write("pre_mean", first.half(), dtype=torch.float32)  # first use: a copy in the dtype asked for
    assert halved.dtype == torch.float32 and layer.pre_mean is halved


def test_dense_fc1_writes_the_neuron_major_cache_in_place():
    torch.manual_seed(4)
    B, L, d, hidden, block = 1, 96, 24, 64, 32  # whole blocks, as FLUX's sizes (a partial one is padded: a copy)
    # Parameters, as the model's: their requires_grad once made matmul copy its transposed result.
    w1, b1 = torch.nn.Parameter(torch.randn(hidden, d) / d ** 0.5), torch.nn.Parameter(torch.randn(hidden))
    layer = layers.SparseMlp(0, ManualClock(), MlpConfig(bm=block), w1, b1, torch.randn(16, hidden), None, None)
    layer.begin(torch.randn(B, L, d))
    addresses = []
    for x in (torch.randn(B, L, d), torch.randn(B, L, d)):  # the first call makes the cache, the second reuses it
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            act, pre_mean = layer._dense_fc1(x)
        copies = [e.input_shapes for e in prof.events() if e.name in ("aten::copy_", "aten::clone")
                  and any(math.prod(shape) >= L * hidden for shape in e.input_shapes if shape)]
        assert not copies, copies  # the cache is written by GELU, not by a transposing copy
        pre = F.linear(x, w1, b1)
        torch.testing.assert_close(act, F.gelu(pre, approximate="tanh"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pre_mean, R.block_means(pre, block), rtol=1e-5, atol=1e-5)
        assert act.transpose(1, 2).is_contiguous()  # neuron-major storage, as the sparse kernels read it
        assert act is layer.act_cache
        addresses.append(act.data_ptr())
    assert addresses[0] == addresses[1]  # written in place: a step graph holds the buffer's address


def test_neuron_sets_ranked_by_change_from_a_reference_into_a_buffer():
    """The layers' reselection call: bf16 pre-activation means ranked by |now - reference| in float32, written into
    the layer's index buffer, as ranking the change computed beforehand gives them."""
    torch.manual_seed(12)
    now, reference = torch.randn(1, 3, 500).bfloat16(), torch.randn(1, 3, 500)
    change = (now.float() - reference).abs()
    buffer = torch.full((1, 3, 120), -1, dtype=torch.int32)
    got = layers.top_and_random(None, now, 100, 120, 1_000_007, reference=reference, out=buffer)
    expected = R.top_and_random(change, 100, 120, 1_000_007)
    assert got is buffer and torch.equal(got, expected)
    top = change.topk(100, dim=-1).indices
    assert bool(torch.isin(top[0, 0], got[0, 0]).all())  # the 100 largest changes are in, plus 20 others
    assert torch.equal(layers.top_and_random(None, now, 100, 120, 1_000_007, reference=reference), expected)
    scores = torch.randn(2, 4, 300)  # the attention's key sets: the reference's selection without kernels
    assert torch.equal(layers.top_ascending(None, scores, 48), R.top_ascending(scores, 48))


# --- the MLP layer's steps --------------------------------------------------------------------------

def test_mlp_layer_dense_then_sparse_steps_track_the_dense_mlp_with_caches_in_place():
    """With every neuron selected a sparse step is the dense MLP of its new input. The output is never a cache
    itself, and every cache keeps its memory across steps and reselections (a step graph holds the addresses)."""
    clock = ManualClock()
    layer = _mlp(clock, top_keys=1.0, random_keys=0.0)
    xs = [torch.randn(1, 80, D_MODEL) for _ in range(4)]  # 80 tokens: a partial last block of 16
    out = layer(xs[0])  # step 0: dense
    torch.testing.assert_close(out, _dense_mlp(layer, xs[0]), rtol=1e-5, atol=1e-5)
    assert layer.stats == {"dense": 1, "sparse": 0, "reselect": 0} and layer.neuron_index is None
    addresses = {}
    for step in (1, 2, 3):  # sparse; reselect at 1 and 3
        clock.at(step)
        out = layer(xs[step])
        torch.testing.assert_close(out, _dense_mlp(layer, xs[step]), rtol=1e-5, atol=1e-5)
        assert all(out.data_ptr() != t.data_ptr() for t in _caches(layer).values())  # never handed out
        assert layer.neuron_index.shape == (1, 3, HIDDEN) and layer.last_step == step
        now = {name: t.data_ptr() for name, t in _caches(layer).items()}
        assert addresses.setdefault("first", now) == now
    assert layer.stats == {"dense": 1, "sparse": 3, "reselect": 2} and layer.flags == {"neurons": True}


def _float8_mlp(layer, x):
    """The dense MLP of the float8 values is_fp8 multiplies: x and the activations per token, the weights per row."""
    def q(t):
        return R.dequantize_rows(*R.float8_rows(t))
    act = R.gelu_tanh(F.linear(q(x), q(layer.w1), layer.b1))
    return F.linear(q(act), q(layer.w2), layer.b2)


def test_mlp_layer_in_float8_tracks_the_dense_mlp_of_its_float8_operands():
    """mlp.is_fp8 on the reference path (CPU): a dense step is the MLP of the float8 values (operands dequantized,
    products in float32); with every neuron selected the sparse steps after it (fc2 of the activations' change,
    quantized per token, onto the cache) stay within float8's precision of the full-precision MLP (fresh inputs each
    call)."""
    clock = ManualClock()
    layer = _mlp(clock, top_keys=1.0, random_keys=0.0, is_fp8=True)
    xs = [torch.randn(1, 80, D_MODEL) for _ in range(3)]
    out = layer(xs[0])  # step 0: dense, fc1 and fc2 in float8
    # The bf16-free CPU path rounds the activations to the cache's dtype (float32 here) before fc2 quantizes them.
    torch.testing.assert_close(out, _float8_mlp(layer, xs[0]), rtol=1e-5, atol=1e-5)
    assert set(layer.float8) == {"w1", "w1_scale", "w2", "w2_scale"} and layer.float8["w1"].dtype == R.FLOAT8
    for step in (1, 2):
        clock.at(step)
        out = layer(xs[step])  # sparse: fc1 and fc2 of the change in float8, onto the float32 cache
        reference = _dense_mlp(layer, xs[step])
        assert float((out - reference).norm() / reference.norm()) < 0.06  # float8 e4m3: 3 mantissa bits
    assert layer.stats == {"dense": 1, "sparse": 2, "reselect": 1}


def test_float8_matmul_off_the_gpu_is_the_dequantized_product():
    a, b = torch.randn(40, 24), torch.randn(8, 24)
    (aq, sa), (bq, sb) = R.float8_rows(a), R.float8_rows(b)
    got = layers.float8_matmul(aq, sa, bq, sb, torch.float32)
    torch.testing.assert_close(got, R.dequantize_rows(aq, sa) @ R.dequantize_rows(bq, sb).t(), rtol=0, atol=0)
    assert float((got - a @ b.t()).norm() / (a @ b.t()).norm()) < 0.06  # float8 e4m3: 3 mantissa bits


def test_mlp_layer_sparse_step_recomputes_only_the_selected_neurons():
    clock = ManualClock()
    layer = _mlp(clock, with_bias=False, counts_multiple_of=8)  # 0.35 of 64 -> 24 neurons (19 top + 5 random)
    x0, x1 = torch.randn(1, 64, D_MODEL), torch.randn(1, 64, D_MODEL)
    layer(x0)
    act_before, out_before = layer.act_cache.clone(), layer.out_cache.clone()
    clock.at(1)
    out = layer(x1)
    index = layer.neuron_index
    assert index.shape == (1, 2, 24) and layer.stats["reselect"] == 1
    expected_act, expected_out = act_before.clone(), out_before.clone()
    R.sparse_mlp_reference(x1, layer.w1, layer.b1, layer.w2, index, expected_act, expected_out, 32)
    torch.testing.assert_close(layer.act_cache, expected_act, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.out_cache, expected_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    assert not torch.equal(out, _dense_mlp(layer, x1))  # really sparse


def test_a_new_input_shape_drops_the_caches_and_a_new_generation_keeps_them():
    clock = ManualClock()
    mlp, attention = _mlp(clock), _attention(clock)
    q = torch.randn(1, 96, 2, 16)
    for step in range(3):  # dense, dense + reselect (MLP sparse), sparse: every cache exists
        clock.at(step)
        mlp(torch.randn(1, 96, D_MODEL)), attention(q, q, q)
    assert all(t is not None for t in [*_caches(mlp).values(), *_caches(attention).values()])
    kept = {name: t.data_ptr() for name, t in [*_caches(mlp).items(), *_caches(attention).items()]}
    clock.at(0)  # a new generation at the same shape: the same buffers, their contents marked stale
    mlp(torch.randn(1, 96, D_MODEL)), attention(q, q, q)
    assert mlp.flags == {"neurons": False} and attention.flags == {"keys": True} and mlp.last_step == 0
    assert {name: t.data_ptr() for name, t in [*_caches(mlp).items(), *_caches(attention).items()]} == kept
    clock.at(1)  # a new shape mid-generation: the caches of the old one are dropped, and the layer starts dense
    mlp(torch.randn(1, 64, D_MODEL)), attention(q[:, :64], q[:, :64], q[:, :64])
    assert mlp.neuron_index is None and mlp.act_cache.shape == (1, 64, HIDDEN) and mlp.out_cache.shape == (1, 64, OUT)
    assert mlp.stats == {"dense": 3, "sparse": 2, "reselect": 1}
    assert attention.o_cache.shape == (1, 64, 2, 16) and attention.key_index.shape == (1, 2, 2, 16)
    assert attention.stats == {"dense": 4, "sparse": 1, "reselect": 0}


def test_a_second_call_at_one_step_is_refused():
    clock = ManualClock()
    mlp, attention = _mlp(clock), _attention(clock)
    x, q = torch.randn(1, 64, D_MODEL), torch.randn(1, 64, 2, 16)
    mlp(x), attention(q, q, q)
    clock.at(1)
    mlp(x), attention(q, q, q)
    with pytest.raises(RuntimeError, match=r"MLP layer 3: called twice at step 1 \(true CFG"):
        mlp(x)
    with pytest.raises(RuntimeError, match=r"attention layer 2: called twice at step 1 \(true CFG"):
        attention(q, q, q)
    clock.at(3)  # a later step is fine, also after a skipped one (a feature-cache forecast step)
    mlp(x), attention(q, q, q)
    assert mlp.last_step == attention.last_step == 3


def test_an_mlp_started_ahead_is_joined_with_the_output_a_direct_call_gives():
    """A single block's MLP: start(x) before the attention, join(like) after; on CPU it runs in place at start. The
    custom ops take the layer object itself."""
    clock_a, clock_b = ManualClock(), ManualClock()
    ahead, direct = _mlp(clock_a, with_bias=False), _mlp(clock_b, with_bias=False)
    for step in range(4):
        x = torch.randn(1, 64, D_MODEL)
        clock_a.at(step), clock_b.at(step)
        torch.ops.flux_harness.chipmunk_mlp_start(x, ahead)
        assert ahead.last_step == step  # the step ran at start
        like = torch.empty(1, 64, 7)  # only its rows' shape is read
        joined = torch.ops.flux_harness.chipmunk_mlp_join(like, ahead, OUT)
        assert torch.equal(joined, torch.ops.flux_harness.chipmunk_mlp(x, direct, OUT))
        assert ahead.started is None and ahead.side_stream is None  # handed out once; no side stream on CPU
    assert ahead.stats == direct.stats == {"dense": 1, "sparse": 3, "reselect": 2}


def test_joining_an_mlp_that_did_not_start_this_step_is_refused():
    clock = ManualClock()
    layer = _mlp(clock, with_bias=False)
    x = torch.randn(1, 64, D_MODEL)
    with pytest.raises(RuntimeError, match=r"MLP layer 3: its step starts in its block's forward, which did not run "
                                           r"at step 0"):
        layer.join(x)
    layer.start(x)
    clock.at(1)  # started at step 0, joined at step 1
    with pytest.raises(RuntimeError, match="did not run at step 1"):
        layer.join(x)
    layer.start(x)
    with pytest.raises(RuntimeError, match="did not run at step 1"):  # rows of another shape
        layer.join(torch.randn(1, 32, D_MODEL))


# --- the attention layer's steps --------------------------------------------------------------------

def test_attention_layer_dense_and_sparse_steps_against_dense_attention():
    """Dense steps are the dense kernel's output; a sparse step over every key is dense attention of its new input;
    the key set and o_cache keep their memory across dense steps. The op's output is contiguous, as its fake says."""
    clock = ManualClock()
    layer = _attention(clock, top_keys=1.0)
    qkv = [torch.randn(3, 1, 80, 2, 16) for _ in range(5)]  # 80 queries: groups of 32, 32 and 16
    addresses = set()
    for step, (q, k, v) in enumerate(qkv):
        clock.at(step)
        out = torch.ops.flux_harness.chipmunk_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, layer,
                                                        None)
        assert out.is_contiguous()
        torch.testing.assert_close(out, _sdpa(q, k, v), rtol=1e-5, atol=1e-5)
        assert layer.key_index.shape == (1, 2, 3, 80) and layer.o_cache.shape == q.shape
        addresses.add((layer.key_index.data_ptr(), layer.o_cache.data_ptr()))
    assert len(addresses) == 1
    assert layer.stats == {"dense": 3, "sparse": 2, "reselect": 0}  # dense 0, 1, 4


def test_attention_layer_sparse_step_uses_the_dense_steps_key_set_and_cache():
    torch.manual_seed(9)
    clock = ManualClock()
    layer = _attention(clock)  # 0.165 of 96 keys -> 16 per query group
    q, k, v = (torch.randn(1, 96, 2, 16) for _ in range(3))
    layer(q, k, v)
    clock.at(1)  # dense too (steps 0 and 1): the same key set and cache from the same input
    layer(q, k, v)
    index = R.top_ascending(R.attention_column_sums(q, k, 32), 16)
    assert torch.equal(layer.key_index, index)
    torch.testing.assert_close(layer.o_cache, _sdpa(q, k, v) - R.sparse_attention_reference(q, k, v, index, 32),
                               rtol=1e-5, atol=1e-5)
    o_cache = layer.o_cache.clone()
    q2, k2, v2 = (t + 0.1 * torch.randn_like(t) for t in (q, k, v))
    clock.at(2)
    out = layer(q2, k2, v2)
    torch.testing.assert_close(out, R.sparse_attention_reference(q2, k2, v2, index, 32, o_cache), rtol=0, atol=0)
    assert torch.equal(layer.o_cache, o_cache)  # a sparse step reads the cache only


def test_attention_key_set_is_chosen_once_per_generation_without_recompute_mask():
    clock = ManualClock()
    layer = _attention(clock, recompute_mask=False)
    q0, q1 = torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 16)
    layer(q0, q0, q0)
    index = layer.key_index.clone()
    clock.at(1)  # a dense step: a new o_cache, the same key set
    layer(q1, q1, q1)
    assert torch.equal(layer.key_index, index)
    assert not torch.equal(index, R.top_ascending(R.attention_column_sums(q1, q1, 32), 16))


# --- the dense attention's log-sum-exp ----------------------------------------------------------------

def test_dense_attention_checks_the_kernels_log_sum_exp_once_and_drops_one_that_does_not_match(capsys):
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    lse = torch.logsumexp(torch.einsum("blhd,bmhd->bhlm", q, k) * 16 ** -0.5, dim=-1)  # natural log, (B, H, L)
    checks = []

    def row_lse_log2(q_, k_):
        checks.append(1)
        return lse * math.log2(math.e)

    kernels = types.SimpleNamespace(row_lse_log2=row_lse_log2)  # stands in for the Triton row pass
    out = _sdpa(q, k, v)
    right = layers.DenseAttention(lambda *a: (out, lse), with_lse=True)
    for _ in range(2):
        got, got_lse = right(q, k, v, kernels)
        assert got is out and got_lse is lse and right.lse_trusted is True
    assert len(checks) == 1  # checked on the first dense step only
    wrong = layers.DenseAttention(lambda *a: (out, lse * math.log2(math.e)), with_lse=True)  # log2 units
    got, got_lse = wrong(q, k, v, kernels)
    assert got is out and got_lse is None and wrong.lse_trusted is False
    assert "does not match the rows' log-sum-exp" in capsys.readouterr().out
    assert len(checks) == 2
    # Without kernels (the reference path computes its own sums) or without a log-sum-exp, nothing is checked.
    unchecked = layers.DenseAttention(lambda *a: (out, lse), with_lse=True)
    got, got_lse = unchecked(q, k, v, None)
    assert got is out and got_lse is None and unchecked.lse_trusted is None
    plain = layers.DenseAttention(lambda *a: out, with_lse=False)
    got, got_lse = plain(q, k, v, kernels)
    assert got is out and got_lse is None and plain.lse_trusted is None
    assert len(checks) == 2
    assert layers.attention_lse_matches(q, k, lse, kernels)
    assert not layers.attention_lse_matches(q, k, lse.transpose(1, 2), kernels)  # a (B, L, H) layout


def test_kernel_status_says_which_path_runs():
    assert layers.kernels_status(None, torch.device("cpu")) == "PyTorch reference (CPU)"
    fake = types.SimpleNamespace()
    assert layers.kernels_status(fake, torch.device("cuda")) == "Triton kernels"
    assert layers.kernels_status(fake, torch.device("cpu")) == "Triton kernels (interpreted on CPU, slowly)"
    if not torch.cuda.is_available():
        from utils.chipmunk import kernels

        assert layers.triton_kernels() is (kernels if kernels.TRITON_AVAILABLE else None)
        assert layers.kernels_status(None, torch.device("cuda")).startswith("PyTorch reference (SLOW: ")

"""Chipmunk's math in plain PyTorch (utils/chipmunk/reference.py): token reorder, attention column sums and sparse
attention deltas, index selection, MLP deltas, block means, and the hashed random numbers. The Triton kernels are
checked against these functions in tests/interpreted/test_kernels.py."""

import torch
import torch.nn.functional as F

from chipmunk_support import rel
from utils.chipmunk import reference as R


# --- token reorder ----------------------------------------------------------------------------------

def test_patch_order_groups_local_tokens_and_is_a_permutation():
    h, w = 8, 16
    perm = R.patch_order(h, w, 4, 2)
    assert torch.equal(perm.sort().values, torch.arange(h * w))
    rows, cols = perm // w, perm % w
    assert rows[:4].tolist() == [0, 0, 1, 1] and cols[:4].tolist() == [0, 1, 0, 1]  # first 2x2 sub-patch
    assert rows[:16].max() == 3 and cols[:16].max() == 3  # first 4x4 patch before anything else
    assert rows[16:32].tolist() == rows[:16].tolist() and (cols[16:32] - 4).tolist() == cols[:16].tolist()


# --- attention --------------------------------------------------------------------------------------

def test_reference_attention_over_all_keys_is_dense_attention_and_delta_restores_it():
    torch.manual_seed(1)
    B, L, H, D, group = 2, 100, 3, 16, 32
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    sums = R.attention_column_sums(q, k, group)
    assert sums.shape == (B, H, 4, L)
    torch.testing.assert_close(sums.sum(-1)[..., :3], torch.full((B, H, 3), float(group)), rtol=1e-5, atol=1e-4)
    everything = R.top_ascending(sums, L)
    torch.testing.assert_close(R.sparse_attention_reference(q, k, v, everything, group), dense, rtol=1e-5, atol=1e-5)
    some = R.top_ascending(sums, 32)
    partial = R.sparse_attention_reference(q, k, v, some, group)
    assert rel(partial, dense) > 1e-2  # really sparse
    o_cache = R.sparse_attention_reference(q, k, v, some, group, dense_out=dense)  # a dense step's cache
    torch.testing.assert_close(o_cache, dense - partial, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(R.sparse_attention_reference(q, k, v, some, group, o_cache), dense,
                               rtol=1e-5, atol=1e-5)


def test_column_sums_of_a_partial_last_group_count_its_rows_only():
    torch.manual_seed(3)
    q, k = torch.randn(1, 70, 2, 16), torch.randn(1, 50, 2, 16)
    sums = R.attention_column_sums(q, k, 32, heads_per_chunk=1)  # 32 + 32 + 6 rows; one head at a time
    assert sums.shape == (1, 2, 3, 50)
    torch.testing.assert_close(sums.sum(-1), torch.tensor([32.0, 32.0, 6.0]).expand(1, 2, 3), rtol=1e-5, atol=1e-4)
    p = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) * 16 ** -0.5, dim=-1)
    torch.testing.assert_close(sums[:, :, 2], p[:, :, 64:].sum(2), rtol=1e-5, atol=1e-5)


# --- index selection ---------------------------------------------------------------------------------

def test_selected_index_sets_come_out_ascending_as_a_sort_would_give_them():
    torch.manual_seed(11)
    for shape, size, count in (((2, 3, 5), 100, 17), ((1, 4, 6), 4608, 768), ((1, 34), 12288, 4300)):
        scores = torch.randn(*shape, size)
        expected = scores.topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
        assert torch.equal(R.top_ascending(scores, count), expected)


def test_top_and_random_takes_the_top_set_and_seeded_random_others():
    torch.manual_seed(13)
    scores = torch.randn(2, 3, 500)
    got = R.top_and_random(scores, 100, 120, 1_000_007)
    assert got.shape == (2, 3, 120) and got.dtype == torch.int32
    assert bool((got.diff(dim=-1) > 0).all())  # ascending, no index twice
    top = scores.topk(100, dim=-1).indices
    assert bool(torch.isin(top[1, 2], got[1, 2]).all())  # the 100 largest are in, plus 20 others
    assert torch.equal(got, R.top_and_random(scores, 100, 120, torch.tensor(1_000_007)))  # int or tensor seed
    assert not torch.equal(got, R.top_and_random(scores, 100, 120, 1_000_008))  # other random neurons
    assert torch.equal(R.top_and_random(scores, 100, 100, 1_000_007), R.top_ascending(scores, 100))
    # With a reference: ranked by the change |scores - reference|, the scores widened to float32 first.
    now, reference = scores.bfloat16(), torch.randn(2, 3, 500)
    assert torch.equal(R.top_and_random(now, 100, 120, 5, reference=reference),
                       R.top_and_random((now.float() - reference).abs(), 100, 120, 5))


# --- MLP -------------------------------------------------------------------------------------------

def test_reference_mlp_delta_with_all_neurons_tracks_the_dense_mlp():
    torch.manual_seed(2)
    B, L, d, hidden, out, block = 1, 70, 24, 64, 16, 32
    w1, b1, w2 = torch.randn(hidden, d) / d ** 0.5, torch.randn(hidden), torch.randn(out, hidden) / hidden ** 0.5
    x_old, x_new = torch.randn(B, L, d), torch.randn(B, L, d)
    act = F.gelu(F.linear(x_old, w1, b1), approximate="tanh")
    out_cache = F.linear(act, w2).float()
    everything = torch.arange(hidden, dtype=torch.int32).expand(B, 3, hidden).contiguous()
    R.sparse_mlp_reference(x_new, w1, b1, w2, everything, act, out_cache, block)
    expected_act = F.gelu(F.linear(x_new, w1, b1), approximate="tanh")
    torch.testing.assert_close(act, expected_act, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cache, F.linear(expected_act, w2), rtol=1e-5, atol=1e-5)


def test_reference_mlp_delta_updates_only_the_selected_neurons_of_each_block():
    torch.manual_seed(5)
    B, L, d, hidden, out, block, K = 1, 64, 8, 32, 4, 32, 5
    w1, b1, w2 = torch.randn(hidden, d), torch.randn(hidden), torch.randn(out, hidden)
    x, act = torch.randn(B, L, d), torch.randn(B, L, hidden)
    out_cache = F.linear(act, w2)
    index = torch.stack([torch.randperm(hidden)[:K].sort().values for _ in range(2)])[None].int()
    before = act.clone()
    pre = R.sparse_mlp_reference(x, w1, b1, w2, index, act, out_cache, block)
    assert pre.shape == (B, 2, block, K)
    for blk in range(2):
        rows, chosen = slice(blk * block, (blk + 1) * block), index[0, blk].long()
        others = torch.ones(hidden, dtype=torch.bool)
        others[chosen] = False
        assert torch.equal(act[0, rows][:, others], before[0, rows][:, others])
        torch.testing.assert_close(act[0, rows][:, chosen], R.gelu_tanh(F.linear(x[0, rows], w1[chosen], b1[chosen])),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cache, F.linear(act, w2), rtol=1e-4, atol=1e-4)  # the deltas telescope


def test_neuron_major_keeps_the_values_in_hidden_major_storage():
    act = torch.randn(2, 10, 6)
    stored = R.neuron_major(act)
    assert torch.equal(stored, act) and stored.transpose(1, 2).is_contiguous()


def test_block_means_of_partial_and_whole_blocks():
    torch.manual_seed(12)
    x = torch.randn(2, 300, 8)
    assert R.block_sizes(300, 128, "cpu").tolist() == [128.0, 128.0, 44.0]
    expected = torch.stack([x[:, start:start + 128].mean(1) for start in range(0, 300, 128)], 1)
    torch.testing.assert_close(R.block_means(x, 128), expected, rtol=1e-6, atol=1e-6)
    whole = torch.randn(2, 256, 5, dtype=torch.bfloat16)  # whole blocks, bf16: summed in float32, no padding copy
    expected = whole.float().view(2, 2, 128, 5).mean(2)
    got = R.block_means(whole, 128)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --- random neurons ---------------------------------------------------------------------------------

def test_random_neurons_are_a_hash_of_the_seed():
    """The MLP's random neurons are hashed from (layer, step): the same numbers for an int seed or the same seed in a
    tensor (what a CUDA-graph replay reads), different for another seed, and uniform in [0, 1)."""
    a = R.hashed_uniform((4, 300), 17, "cpu")
    assert torch.equal(a, R.hashed_uniform((4, 300), torch.tensor(17), "cpu"))  # int or tensor seed
    assert not torch.equal(a, R.hashed_uniform((4, 300), 18, "cpu"))
    x = R.hashed_uniform((100_000,), torch.randint(0, 2**40, ()).item(), "cpu")
    assert 0 <= float(x.min()) and float(x.max()) < 1
    assert abs(float(x.mean()) - 0.5) < 0.01 and abs(float(x.var()) - 1 / 12) < 0.003
    assert torch.histc(x, 10, 0, 1).min() > 9_000  # no empty or starved bin


def test_hash_offset_wraps_to_signed_int64_as_the_tensor_seed_does():
    for seed in (0, 17, 1_000_003 * 57 + 49, 2**40 + 3):
        wrapped = R.hash_offset(seed)
        assert -2**63 <= wrapped < 2**63
        assert wrapped == int(torch.tensor(seed) * R.HASH_CONSTANTS[0])


def test_float8_rows_scale_each_row_by_its_absolute_max_and_round_within_e4m3():
    """One float32 scale per row, amax / 448 (a row of zeros: 1); dequantized, each element within e4m3's rounding
    (3 mantissa bits: half a step is 2^-4 of the value) or, below e4m3's normal range, half its subnormal step; the
    strides kept (a neuron-major activation cache quantizes in place of layout)."""
    t = torch.randn(3, 50, 40) * torch.logspace(-3, 3, 40)
    t[1, 7] = 0
    q, scale = R.float8_rows(t)
    assert q.dtype == R.FLOAT8 and scale.dtype == torch.float32 and scale.shape == (3, 50)
    torch.testing.assert_close(scale, torch.where(t.abs().amax(-1) > 0, t.abs().amax(-1) / 448, torch.ones(())))
    assert torch.equal(q[1, 7].float(), torch.zeros(40)) and scale[1, 7] == 1
    back = R.dequantize_rows(q, scale)
    assert (back - t).abs().le(t.abs() * 2 ** -4 + scale[..., None] * 2 ** -10).all()
    assert float(back.abs().amax(-1).div(t.abs().amax(-1).clamp_min(1e-30)).sub(1).abs()[t.abs().amax(-1) > 0].max()) \
        < 1e-6  # the row's max maps to 448 exactly
    neuron_major = R.neuron_major(t)
    assert R.float8_rows(neuron_major)[0].stride() == neuron_major.stride()

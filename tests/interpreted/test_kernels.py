"""Chipmunk's Triton kernels (utils/chipmunk/kernels.py) against the PyTorch reference (utils/chipmunk/reference.py),
run on CPU tensors through Triton's interpreter at small shapes. Collected only when TRITON_INTERPRET=1 (it must be
set before Triton is imported: tests/conftest.py); tests/test_chipmunk_kernels.py runs this directory so.

The interpreter runs one small config per kernel (16-wide tiles) and never the compiler: what the kernels build
to on the GPU is checked by tests/test_chipmunk_kernels_sm90.py."""

import math

import pytest
import torch

pytest.importorskip("triton", reason="Triton comes with the CUDA build of torch that requirements.txt installs")

from utils.chipmunk import kernels as T  # noqa: E402
from utils.chipmunk import layers  # noqa: E402
from utils.chipmunk import reference as C  # noqa: E402

if not T.INTERPRET:
    raise RuntimeError("these checks run the kernels on CPU tensors through Triton's interpreter: run them with "
                       "TRITON_INTERPRET=1 set before Triton is imported (tests/test_chipmunk_kernels.py does)")
assert T.TRITON_AVAILABLE, T.UNAVAILABLE_REASON

B, L, H, D, GROUP = 1, 80, 2, 16, 32


@pytest.fixture
def qkv():
    torch.manual_seed(4)
    return tuple(torch.randn(B, L, H, D) for _ in range(4))  # q, k, v, o_cache


def _lse(q, k):
    """The rows' log-sum-exp of the scaled scores, natural log, (B, H, L): as FA3 returns it."""
    return torch.logsumexp(torch.einsum("blhd,bmhd->bhlm", q, k) * q.shape[-1] ** -0.5, dim=-1)


# --- attention -------------------------------------------------------------------------------------

def test_column_sums_match_the_reference(qkv):
    q, k, _, _ = qkv
    sums = C.attention_column_sums(q, k, GROUP)
    torch.testing.assert_close(T.attention_column_sums(q, k, GROUP), sums, rtol=1e-5, atol=1e-5)
    # With the rows' log-sum-exp handed in the first pass is skipped.
    torch.testing.assert_close(T.attention_column_sums(q, k, GROUP, _lse(q, k)), sums, rtol=1e-5, atol=1e-5)


def test_column_sums_over_ragged_groups_and_strided_views_match_the_reference():
    """A program walks GROUPS_PER_PROGRAM (2 interpreted) consecutive groups: 7 groups of 16 rows over 100 queries
    leave the last program one group, itself ragged (4 rows); 70 keys end in a partial key tile; q and k are views
    with strides."""
    torch.manual_seed(5)
    qk = torch.randn(2, 100, 2, 3, 32)
    q, k = qk[:, :, 0], qk[:, :70, 1]
    torch.testing.assert_close(T.attention_column_sums(q, k, 16), C.attention_column_sums(q, k, 16),
                               rtol=1e-5, atol=1e-6)


def test_the_log_sum_exp_check_accepts_the_rows_log_sum_exp_only(qkv):
    """The check before trusting a dense kernel's log-sum-exp: right units pass, log2 units or a layout transposed
    to (B, L, H) do not."""
    q, k, _, _ = qkv
    lse = _lse(q, k)
    assert layers.attention_lse_matches(q, k, lse, T)
    assert not layers.attention_lse_matches(q, k, lse * 1.4426950408889634, T)
    assert not layers.attention_lse_matches(q, k, lse.transpose(1, 2), T)
    torch.testing.assert_close(T.row_lse_log2(q, k), lse * math.log2(math.e), rtol=1e-5, atol=1e-5)


def test_sparse_attention_matches_the_reference_on_sparse_and_dense_steps(qkv):
    q, k, v, o_cache = qkv
    index = C.top_ascending(C.attention_column_sums(q, k, GROUP), 24)
    for cache in (None, o_cache):
        torch.testing.assert_close(T.sparse_attention(q, k, v, index, GROUP, cache),
                                   C.sparse_attention_reference(q, k, v, index, GROUP, cache), rtol=1e-5, atol=1e-5)
    # A dense step's o_cache = O_dense - A_S in one pass, also into a given buffer (the layer's o_cache).
    dense_out = torch.randn_like(q)
    expected = C.sparse_attention_reference(q, k, v, index, GROUP, dense_out=dense_out)
    torch.testing.assert_close(T.sparse_attention(q, k, v, index, GROUP, dense_out=dense_out), expected,
                               rtol=1e-5, atol=1e-5)
    buffer = torch.randn_like(q)
    assert T.sparse_attention(q, k, v, index, GROUP, dense_out=dense_out, out=buffer) is buffer
    torch.testing.assert_close(buffer, expected, rtol=1e-5, atol=1e-5)
    # A sparse step written over the o_cache it reads: each element is read before it is written, by one program.
    in_place = dense_out.clone()
    T.sparse_attention(q, k, v, index, GROUP, o_cache=in_place, out=in_place)
    torch.testing.assert_close(in_place, C.sparse_attention_reference(q, k, v, index, GROUP, o_cache=dense_out),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="o_cache .a sparse step. or dense_out .a dense step., not both"):
        T.sparse_attention(q, k, v, index, GROUP, o_cache=o_cache, dense_out=dense_out)


@pytest.mark.parametrize("keys", [24, 32])
def test_sparse_attention_over_groups_of_two_row_tiles_matches_the_reference(qkv, keys):
    """A 48-row group spans a 32-row and a 16-row tile (the last group partial). 24 keys: a masked last key tile; 32:
    unmasked tiles."""
    q, k, v, o_cache = qkv
    index = C.top_ascending(C.attention_column_sums(q, k, 48), keys)
    for cache in (None, o_cache):
        torch.testing.assert_close(T.sparse_attention(q, k, v, index, 48, cache),
                                   C.sparse_attention_reference(q, k, v, index, 48, cache), rtol=1e-5, atol=1e-5)


# --- selection -------------------------------------------------------------------------------------

def test_top_ascending_is_topk_then_sort_and_ties_go_to_the_lower_index():
    torch.manual_seed(6)
    for shape, count in (((2, 3, 300), 40), ((1, 4608), 768), ((4, 12288), 4352)):
        scores = torch.randn(*shape)
        assert torch.equal(T.top_ascending(scores, count), scores.topk(count, -1).indices.sort(-1).values.int())
    ties = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [-1.0, -0.5, 0.0, -2.0, 5.0, -0.25]])
    assert T.top_ascending(ties, 2).tolist() == [[1, 2], [2, 4]]
    scores = torch.randn(2, 4, 300)  # the layers' dispatch: one launch with the kernels
    assert torch.equal(layers.top_ascending(T, scores, 48), T.top_ascending(scores, 48))


@pytest.mark.parametrize("shape, top, total", [((1, 3, 300), 60, 90), ((2, 12288), 3686, 4352)])
def test_top_and_random_is_the_two_launches_it_replaces(shape, top, total):
    """A neuron set with its random keys in one kernel: the same as hashed noise over the rest with the top set
    scored 2.0, then a second selection; for int seeds (one whose hash offset fits int32: 0) and a seed in a
    tensor."""
    torch.manual_seed(7)
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
    got = layers.top_and_random(T, now, top, total, 1_000_007, reference=reference, out=buffer)
    assert got is buffer and torch.equal(got, T.top_and_random((now.float() - reference).abs(), top, total, 1_000_007))


def _key_order_top(x, count):
    """The kernels' rule: a stable sort of the order-preserving int32 keys, ties to the lower index, -0.0 below
    +0.0."""
    bits = x.view(torch.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # as the kernels' _float_key
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :count].sort(-1).values.int()


def _every_search(fn, *args):
    """`fn` with every search for the K-th largest key, and the default (the autotuner's pick on a GPU): all equal."""
    bitwise = fn(*args, search="bitwise")
    for search in (*T.SELECTION_SEARCHES, None):
        got = fn(*args, search=search)
        assert torch.equal(got, bitwise), (fn.__name__, search, args[1:], (got != bitwise).sum())
    return bitwise


def _few_levels(*shape):
    return (torch.randn(*shape) * 2).round()  # ~9 values per row, -0.0 among them


def _bit_patterns():
    bits = torch.randint(-2**31, 2**31, (2, 777), dtype=torch.int32)
    bits[0, :4] = torch.tensor([-2**31, 2**31 - 1, 0, -1], dtype=torch.int32)  # -0.0, +0.0, the extreme keys
    return bits.view(torch.float32)


@pytest.mark.parametrize("make_scores, counts", [
    (lambda: torch.randn(2, 12288), (4352,)),
    (lambda: _few_levels(2, 12288), (1, 4352, 12288)),
    (lambda: _few_levels(3, 37), (1, 5, 37)),
    (lambda: torch.randn(2, 1), (1,)),
    (_bit_patterns, (1, 300, 777)),
], ids=["random", "ties", "short-odd-rows", "one-key", "every-bit-pattern"])
def test_every_selection_search_gives_the_same_indices_as_the_reference(make_scores, counts):
    """The searches for the K-th largest key (bitwise, radix) against each other and the PyTorch reference: random
    rows, rows of few values (many ties, -0.0 and +0.0 among them), short odd rows (padding lanes), K = 1 and K = N,
    and random bit patterns (every int32 key, NaNs too). torch.topk breaks ties its own way, so tied rows are checked
    against the kernels' rule and, for the selected values, against the reference."""
    torch.manual_seed(5)
    scores = make_scores()
    seed = 1_000_007
    ties = scores.unique().numel() < scores.numel()
    for count in counts:
        got = _every_search(T.top_ascending, scores, count)
        assert torch.equal(got, _key_order_top(scores, count)), (scores.shape, count)
        if not ties:
            assert torch.equal(got, C.top_ascending(scores, count))
        elif not scores.isnan().any():
            assert torch.equal(scores.gather(-1, got.long()).sort(-1).values,
                               scores.gather(-1, C.top_ascending(scores, count).long()).sort(-1).values)
    for top, total in {(counts[0], counts[-1]), (counts[-1], counts[-1]), (max(1, counts[0] * 3 // 4), counts[0])}:
        got = _every_search(T.top_and_random, scores, top, total, seed)
        noise = C.hashed_uniform(scores.shape, seed, "cpu")
        assert torch.equal(got, _key_order_top(noise.scatter_(-1, _key_order_top(scores, top).long(), 2.0), total))
        if not ties:
            assert torch.equal(got, C.top_and_random(scores, top, total, seed))


# --- MLP -------------------------------------------------------------------------------------------

HIDDEN, BLOCK = 64, 32


def _neuron_sets(K, blocks=3, batch=1):
    return torch.stack([torch.stack([torch.randperm(HIDDEN)[:K].sort().values for _ in range(blocks)])
                        for _ in range(batch)]).int()


def _block_means_of_selected(pre, length):
    rows = (torch.arange(pre.shape[1] * BLOCK) < length).view(pre.shape[1], BLOCK)
    return (pre * rows[None, :, :, None]).sum(2) / rows.sum(1)[None, :, None]


@pytest.mark.parametrize("layout", [lambda t: t, C.neuron_major], ids=["token-major", "neuron-major"])
@pytest.mark.parametrize("d, out, K", [(32, 24, 20), (24, 32, 32), (32, 32, 20), (32, 24, 32)])
def test_sparse_mlp_matches_the_reference(d, out, K, layout):
    """The MLP kernels' loops drop their load masks when every tile is full (16 wide, interpreted): (inputs, outputs,
    neurons) = (32, 24, 20) takes fc1's unmasked loop and fc2's fully masked one, (24, 32, 32) the other two, and
    (32, 32, 20), (32, 24, 32) fc2's loads masked along one dim. 80 tokens in blocks of 32: a partial last row tile.
    The activation cache in either layout (the kernel takes any strides)."""
    torch.manual_seed(4)
    x, w1, b1 = torch.randn(B, L, d), torch.randn(HIDDEN, d) / d ** 0.5, torch.randn(HIDDEN)
    w2 = torch.randn(out, HIDDEN) / 8
    index = _neuron_sets(K)
    act, out_cache = layout(torch.randn(B, L, HIDDEN)), torch.randn(B, L, out)
    act_ref, out_ref, act_before, out_before = act.clone(), out_cache.clone(), act.clone(), out_cache.clone()
    pre = C.sparse_mlp_reference(x, w1, b1, w2, index, act_ref, out_ref, BLOCK)
    low = torch.full((B, L, out), float("nan"), dtype=torch.bfloat16)
    means = T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, act, out_cache, BLOCK, out=low)
    torch.testing.assert_close(act, act_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cache, out_ref, rtol=1e-5, atol=1e-5)
    # fc2's epilogue: the updated cache, rounded once. Within one bf16 step: the interpreter truncates where the GPU
    # (cvt.rn) and torch round to nearest.
    torch.testing.assert_close(low.float(), out_cache.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)
    assert not torch.equal(act, act_before) and act.stride() == act_before.stride()  # updated in place, same layout
    torch.testing.assert_close(means, _block_means_of_selected(pre, L), rtol=1e-5, atol=1e-5)
    # Given the layer's reference pre-activations (B, nb, hidden), the delta kernel writes the means into their
    # neurons' places, as the scatter it replaces, bit for bit; the caches' update is unchanged.
    pre_mean, a2, o2 = torch.randn(B, 3, HIDDEN), act_before.clone(), out_before.clone()
    expected = pre_mean.clone().scatter_(2, index.long(), means)
    assert T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, a2, o2, BLOCK, pre_mean=pre_mean) is None
    assert torch.equal(pre_mean, expected) and torch.equal(a2, act) and torch.equal(o2, out_cache)


@pytest.mark.parametrize("d, out, K, tma, fc2", [(32, 24, 20, False, True), (24, 32, 32, False, False),
                                                (32, 24, 20, True, True), (48, 32, 32, True, True)])
def test_sparse_mlp_in_float8_matches_the_reference_of_its_float8_values(d, out, K, tma, fc2):
    """mlp.is_fp8: x and W1 in float8 e4m3 with their row scales (reference.float8_rows); fc1 multiplies float8
    tiles (exact float32 sums) and scales them by token and by gathered neuron in its epilogue; with `fc2`, W2's
    float8 rows too (gathered as W2^T rows, scaled by output column) and the deltas quantized per token before fc2:
    the reference of the dequantized operands, in float32. Through the pointer kernels (d = 32: fc1's unmasked loop,
    24: its masked one) and fc1's TMA one (float8 rows of 32 and 48 bytes: TMA needs them 16-byte aligned; a float8
    fc2 takes the pointer kernel). Scales with bf16 operands (or float8 without scales) are refused."""
    torch.manual_seed(5)
    x, w1, b1 = torch.randn(B, L, d) * 3, torch.randn(HIDDEN, d) / d ** 0.5, torch.randn(HIDDEN)
    w2 = torch.randn(out, HIDDEN) / 8
    index = _neuron_sets(K)
    act, out_cache = C.neuron_major(torch.randn(B, L, HIDDEN)), torch.randn(B, L, out)
    (xq, x_scale), (w1q, w1_scale), (w2q, w2_scale) = C.float8_rows(x), C.float8_rows(w1), C.float8_rows(w2)
    act_ref, out_ref = act.clone(), out_cache.clone()
    pre = C.sparse_mlp_reference(C.dequantize_rows(xq, x_scale), C.dequantize_rows(w1q, w1_scale), b1,
                                 C.dequantize_rows(w2q, w2_scale) if fc2 else w2, index, act_ref, out_ref, BLOCK,
                                 float8_deltas=fc2)
    means = T.sparse_mlp(xq, w1q, b1, (w2q if fc2 else w2).t().contiguous(), index, act, out_cache, BLOCK, tma=tma,
                         x_scale=x_scale, w1_scale=w1_scale, w2_scale=w2_scale if fc2 else None)
    torch.testing.assert_close(act, act_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cache, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means, _block_means_of_selected(pre, L), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float8 fc1 takes x and w1 in float8"):
        T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, act, out_cache, BLOCK, x_scale=x_scale, w1_scale=w1_scale)
    with pytest.raises(ValueError, match="float8 fc1 takes x and w1 in float8"):
        T.sparse_mlp(xq, w1q, b1, w2.t().contiguous(), index, act, out_cache, BLOCK)
    with pytest.raises(ValueError, match="float8 fc2 takes w2_t in float8"):
        T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, act, out_cache, BLOCK, w2_scale=w2_scale)


@pytest.mark.parametrize("tile, chunk", [(256, 64), (128, 64)])
@pytest.mark.parametrize("K", [20, 32])
@pytest.mark.parametrize("nout", [300, 256])
def test_fc2_epilogue_in_column_chunks_matches_whole_tiles(nout, K, tile, chunk):
    """fc2's epilogue in column chunks at the GPU's tiles, 128x256 and 128x128 in chunks of 64 (here 32-row tiles):
    the float32 cache and its bf16 copy bit for bit as one whole-tile update gives them, and as the reference. 300
    outputs leave a partial last tile (masked chunks, one of them wholly past the end), 256 none; 20 neurons take the
    masked K loop, 32 the unmasked one."""
    torch.manual_seed(4)
    delta, w2_t = torch.randn(B, L, K), torch.randn(HIDDEN, nout) / 8
    index = _neuron_sets(K)
    cache = torch.randn(B, L, nout)
    expected = cache + torch.einsum("blk,blkn->bln", delta, w2_t[index[0, torch.arange(L) // BLOCK].long()][None])
    results = []
    for epilogue_n in (tile, chunk):
        out_cache, low = cache.clone(), torch.full((B, L, nout), float("nan"), dtype=torch.bfloat16)
        T._sparse_fc2_kernel.fn[(T.triton.cdiv(L, 32), T.triton.cdiv(nout, tile), B)](
            delta, w2_t, index, out_cache, low, cache, cache, delta.stride(0), delta.stride(1), out_cache.stride(0),
            out_cache.stride(1), low.stride(0), low.stride(1), L, K, nout, 3, BLOCK, WRITE_LOW=True, BLOCK_M=32,
            BLOCK_N=tile, BLOCK_K=16, EPILOGUE_N=epilogue_n, EVEN_K=K % 16 == 0, EVEN_N=nout % tile == 0,
            FP8=False, num_warps=4, num_stages=1)  # (the float8 scales' pointers: never read with FP8 off)
        results.append((out_cache, low))
    (whole, whole_low), (chunked, chunked_low) = results
    assert torch.equal(chunked, whole) and torch.equal(chunked_low, whole_low), (nout, K, tile)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_low.float(), chunked.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("block", [32, 24])
def test_dense_mlp_epilogue_writes_gelu_into_the_neuron_major_cache_and_the_block_means(block):
    """A dense MLP step's epilogue over W1 x^T: bias, GELU into the neuron-major cache, block means (blocks of 32 and
    of 24, a size that is no power of two; 80 tokens leave a partial last block)."""
    torch.manual_seed(4)
    pre_t, b1 = torch.randn(2, 40, 80), torch.randn(40)
    act_t = torch.full_like(pre_t, float("nan"))
    means = T.dense_mlp_epilogue(pre_t, b1, act_t, block)
    biased = (pre_t + b1[:, None]).transpose(1, 2)
    torch.testing.assert_close(act_t.transpose(1, 2), C.gelu_tanh(biased), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means, C.block_means(biased, block), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d, out, K, strided", [(32, 24, 18, False), (24, 32, 32, True)])
def test_sparse_mlp_tma_kernels_match_the_pointer_kernels_and_the_reference(d, out, K, strided):
    """sparse_mlp(tma=True) (the layers' path on Hopper: fc1's X and fc2's deltas through TMA descriptors over
    (B * L, width) views) against the pointer kernels (tma=False) and the reference. Batch size 2 and 80 tokens in
    blocks of 32: the last row tile is partial, so batch 0's last tile reads batch 1's first rows through the view
    and batch 1's reads past the end (zeros); stores of those rows would land in batch 1's rows of the caches.
    (32, 24, 18): 18 float32 deltas are 72 bytes, so the deltas' rows are padded to 16 bytes; fc2's loop masked.
    (24, 32, 32): a partial DM tile (zero columns from TMA). A batch-strided x (a view) is copied into the
    (B * L, DM) layout."""
    torch.manual_seed(6)
    batch = 2
    x = torch.randn(batch, L + 3, d)[:, :L] if strided else torch.randn(batch, L, d)
    w1, b1, w2 = torch.randn(HIDDEN, d) / d ** 0.5, torch.randn(HIDDEN), torch.randn(out, HIDDEN) / 8
    index = _neuron_sets(K, batch=batch)
    act, out_cache = C.neuron_major(torch.randn(batch, L, HIDDEN)), torch.randn(batch, L, out)
    results = {}
    for tma in (False, True):
        a, o = act.clone(), out_cache.clone()
        low = torch.full((batch, L, out), float("nan"), dtype=torch.bfloat16)
        results[tma] = (a, o, low, T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, a, o, BLOCK, out=low, tma=tma))
    act_ref, out_ref = act.clone(), out_cache.clone()
    pre = C.sparse_mlp_reference(x, w1, b1, w2, index, act_ref, out_ref, BLOCK)
    for got, expected in zip(results[True], results[False]):  # the same tiles and sums
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    a, o, low, means = results[True]
    torch.testing.assert_close(a, act_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.float(), o.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)  # as above
    torch.testing.assert_close(means, _block_means_of_selected(pre, L), rtol=1e-5, atol=1e-5)
    # The means written into the layer's reference pre-activations by the delta kernel, with either fc1.
    for tma in (False, True):
        pre_mean = torch.randn(batch, 3, HIDDEN)
        expected = pre_mean.clone().scatter_(2, index.long(), results[tma][3])
        T.sparse_mlp(x, w1, b1, w2.t().contiguous(), index, act.clone(), out_cache.clone(), BLOCK, tma=tma,
                     pre_mean=pre_mean)
        assert torch.equal(pre_mean, expected), tma

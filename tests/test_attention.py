"""The FA3 custom op: its fake implementation lets torch.compile trace it on CPU (with the SDPA fallback
kernel), it computes exact attention there, and FlopCounterMode counts it."""

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from utils.attention import fa3_attention


def _qkv(b=2, s=48, h=3, d=16):
    return (torch.randn(b, s, h, d, dtype=torch.float64) for _ in range(3))


def test_fallback_matches_reference_attention_in_fp64():
    q, k, v = _qkv()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    out = fa3_attention(q, k, v, False)
    assert out.shape == q.shape and out.is_contiguous()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def test_fake_impl_traces_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = (t.float() for t in _qkv())
    fn = torch.compile(lambda a, b, c: fa3_attention(a, b, c, False) * 2.0, fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, expected * 2.0, rtol=1e-5, atol=1e-6)


def test_op_passes_torch_library_opcheck():
    q, k, v = (t.float() for t in _qkv(b=1, s=32, h=2, d=8))
    torch.library.opcheck(torch.ops.flux_harness.fa3_attention.default, (q, k, v, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_flop_counter_counts_the_custom_op():
    q, k, v = _qkv(b=2, s=48, h=3, d=16)
    with FlopCounterMode(display=False) as counter:
        fa3_attention(q, k, v, False)
    assert counter.get_total_flops() == 4 * 2 * 3 * 48 * 48 * 16

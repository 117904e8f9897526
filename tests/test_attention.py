"""The FA3 custom op: its fake implementation lets torch.compile trace it on CPU (with the SDPA fallback
kernel), it computes exact attention there, and FlopCounterMode counts it. Its fp8 entry casts q/k/v in the
traced graph (where inductor can fuse the casts), not inside the op."""

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from utils.attention import FP8, fa3_attention, fa3_fp8_attention


def _qkv(b=2, s=48, h=3, d=16):
    return (torch.randn(b, s, h, d, dtype=torch.float64) for _ in range(3))


def test_fallback_matches_reference_attention_in_fp64():
    q, k, v = _qkv()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    out = fa3_attention(q, k, v)
    assert out.shape == q.shape and out.is_contiguous()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def test_fake_impl_traces_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = (t.float() for t in _qkv())
    fn = torch.compile(lambda a, b, c: fa3_attention(a, b, c) * 2.0, fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, expected * 2.0, rtol=1e-5, atol=1e-6)


def test_op_passes_torch_library_opcheck():
    q, k, v = (t.float() for t in _qkv(b=1, s=32, h=2, d=8))
    torch.library.opcheck(torch.ops.flux_harness.fa3_attention.default, (q, k, v),
                          test_utils=("test_schema", "test_faketensor"))
    # The fake's dtype rule for float8 inputs (test_schema's own checks multiply the inputs: no float8 mul on CPU).
    torch.library.opcheck(torch.ops.flux_harness.fa3_attention.default, tuple(t.to(FP8) for t in (q, k, v)),
                          test_utils=("test_faketensor",))


def test_flop_counter_counts_the_custom_op():
    q, k, v = _qkv(b=2, s=48, h=3, d=16)
    with FlopCounterMode(display=False) as counter:
        fa3_attention(q, k, v)
    assert counter.get_total_flops() == 4 * 2 * 3 * 48 * 48 * 16


def test_fp8_attention_is_attention_of_the_e4m3_rounded_inputs():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(b=1, s=40, h=2, d=16))
    out = fa3_fp8_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    rounded = [t.to(FP8).to(torch.float64) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in rounded)).transpose(1, 2)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2  # bf16 output rounding, on fp8-exact inputs
    exact = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert ((out.double() - exact).norm() / exact.norm()).item() > 1e-3  # e4m3's rounding is really applied


def test_fp8_casts_are_traced_outside_the_op():
    """The compiled graph holds the three float8 casts as its own nodes, so inductor can fuse them with the ops that
    make q/k/v; the op receives float8 tensors and returns the caller's dtype."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    q, k, v = (t.to(torch.bfloat16) for t in _qkv(b=1, s=32, h=2, d=8))
    out = torch.compile(lambda a, b, c: fa3_fp8_attention(a * 1.0, b, c), fullgraph=True, backend=backend)(q, k, v)
    torch.testing.assert_close(out, fa3_fp8_attention(q, k, v), rtol=0, atol=0)
    (gm,) = graphs
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to" and FP8 in n.args]
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.flux_harness.fa3_attention.default]
    assert len(casts) == 3 and len(ops) == 1
    assert all(cast in ops[0].args for cast in casts)


def test_the_op_takes_tensors_only_and_float8_inputs_give_bf16():
    """torch 2.11's AOTInductor proxy executor mistranslates a custom op's dtype argument (bf16 arrived as quint8
    inside the exported blocks, pytorch/pytorch#169157): the op's schema holds tensors only, and
    the output dtype follows from the inputs'."""
    schema = torch.ops.flux_harness.fa3_attention.default._schema
    assert [str(a.type) for a in schema.arguments] == ["Tensor"] * 3
    q, k, v = (t.float() for t in _qkv(b=1, s=24, h=2, d=16))
    out8 = fa3_attention(q.to(FP8), k.to(FP8), v.to(FP8))
    assert out8.dtype == torch.bfloat16 and out8.shape == q.shape
    out = fa3_fp8_attention(q, k, v)  # an fp32 model (--disable_bf16) gets fp32 back
    assert out.dtype == torch.float32 and torch.equal(out, out8.float())

"""Chipmunk's layers calling the Triton kernels (run through Triton's interpreter on CPU) against the same layers on
the PyTorch reference path: the layers' kernel-side state (the neuron-major activation cache, the W2^T copy, the
means written into pre_mean by the delta kernel, multi-tile query groups, the o_cache buffer written by the kernel)
is exercised. Collected only when TRITON_INTERPRET=1 (tests/conftest.py); tests/test_chipmunk_kernels.py runs this
directory so."""

import math

import pytest
import torch

pytest.importorskip("triton", reason="Triton comes with the CUDA build of torch that requirements.txt installs")

from chipmunk_support import TINY_CONFIG, ManualClock  # noqa: E402
from utils.benchmark_utils import pipeline_call_kwargs  # noqa: E402
from utils.chipmunk import flux, layers  # noqa: E402
from utils.chipmunk import kernels as T  # noqa: E402
from utils.chipmunk.config import MlpConfig, load_chipmunk_config  # noqa: E402
from utils.pipeline_utils import load_pipeline  # noqa: E402

if not T.INTERPRET:
    raise RuntimeError("these checks run the kernels on CPU tensors through Triton's interpreter: run them with "
                       "TRITON_INTERPRET=1 set before Triton is imported (tests/test_chipmunk_kernels.py does)")
assert T.TRITON_AVAILABLE, T.UNAVAILABLE_REASON


def test_chipmunk_layers_on_the_triton_path_match_the_reference_path(make_args):
    """The whole tiny pipeline with the layers calling the kernels, against the reference path."""
    # Three 16-row tiles per query group, as FLUX's 192 = three 64-row tiles; column sums once per layer (~6 s a
    # call interpreted; test_kernels.py checks them).
    overrides = {"attn": {"mbm": 48, "recompute_mask": False}}
    latents = {}
    for kernels in ("reference", "triton"):
        pipe = load_pipeline(make_args("--disable_bf16"))
        status = flux.apply_chipmunk_config(pipe, load_chipmunk_config(TINY_CONFIG, overrides=overrides),
                                            kernels=kernels)
        assert status.endswith("kernels: Triton kernels (interpreted on CPU, slowly)" if kernels == "triton" else
                               "kernels: PyTorch reference (CPU)"), status
        assert all(layer.kernels is (T if kernels == "triton" else None) for layer in pipe.transformer.chipmunk_layers)
        latents[kernels] = pipe(**pipeline_call_kwargs(make_args("--num_inference_steps", "5")),
                                generator=torch.manual_seed(0), output_type="latent").images
        stats = flux.chipmunk_stats(pipe)
        assert all(v["sparse"] and v["dense"] for v in stats.values()), stats  # both paths of every layer ran
    assert torch.isfinite(latents["triton"]).all()
    torch.testing.assert_close(latents["triton"], latents["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("is_fp8", [False, True], ids=["bf16", "float8"])
def test_an_mlp_layer_on_the_kernels_matches_the_reference_layer_in_a_batch(is_fp8):
    """Batch 2, 80 tokens in blocks of 32 (a partial last block), over a dense step, a reselection and a sparse step:
    the outputs and the caches the kernels write (in place, at the same addresses) agree with the reference layer's;
    with mlp.is_fp8 too (the kernels' float8 fc1 against the reference's dequantized operands)."""
    torch.manual_seed(10)
    w1, b1 = torch.randn(64, 24) / 24 ** 0.5, torch.randn(64)
    w2, b2 = torch.randn(16, 64) / 8, torch.randn(16)
    clock = ManualClock()
    config = MlpConfig(bm=32, counts_multiple_of=16, full_step_every=4, is_fp8=is_fp8)
    on_kernels, on_reference = (layers.SparseMlp(3, clock, config, w1, b1, w2, b2, kernels) for kernels in (T, None))
    addresses = set()
    for step in range(3):
        clock.at(step)
        x = torch.randn(2, 80, 24)
        torch.testing.assert_close(on_kernels(x), on_reference(x), rtol=1e-5, atol=1e-5)
        for name in layers.SparseMlp.CACHES:
            got, expected = getattr(on_kernels, name), getattr(on_reference, name)
            if name == "neuron_index" and step == 0:
                assert got is None and expected is None
            elif name == "neuron_index":
                assert torch.equal(got, expected)
            else:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if step:
            addresses.add(tuple(getattr(on_kernels, name).data_ptr() for name in layers.SparseMlp.CACHES))
    assert len(addresses) == 1
    assert on_kernels.stats == on_reference.stats == {"dense": 1, "sparse": 2, "reselect": 1}
    assert on_kernels.act_cache.transpose(1, 2).is_contiguous()  # neuron-major, as the sparse kernels gather it


def test_the_dense_attention_trusts_a_log_sum_exp_the_triton_row_pass_confirms():
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 48, 2, 16) for _ in range(3))
    lse = torch.logsumexp(torch.einsum("blhd,bmhd->bhlm", q, k) * 16 ** -0.5, dim=-1)
    out = torch.randn(1, 48, 2, 16)
    right = layers.DenseAttention(lambda *a: (out, lse), with_lse=True)
    got, got_lse = right(q, k, v, T)
    assert got is out and got_lse is lse and right.lse_trusted is True
    log2_units = layers.DenseAttention(lambda *a: (out, lse * math.log2(math.e)), with_lse=True)
    got, got_lse = log2_units(q, k, v, T)
    assert got is out and got_lse is None and log2_units.lse_trusted is False

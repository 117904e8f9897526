import pytest
import torch

from utils import benchmark_utils
from utils.benchmark_utils import STAGE_TIMER, annotate_pipeline
from utils.flux_builders import build_tiny_pipeline


def test_annotation_times_each_stage_and_restores_methods_and_installed_forwards():
    pipe = build_tiny_pipeline()
    calls = []
    eager_forward = pipe.transformer.forward

    def installed_forward(*args, **kwargs):  # as export_aoti installs one: an instance attribute
        calls.append(1)
        return eager_forward(*args, **kwargs)
    pipe.transformer.forward = installed_forward
    STAGE_TIMER.enabled = True
    try:
        with annotate_pipeline(pipe):
            pipe("a cat", height=64, width=64, num_inference_steps=3, max_sequence_length=32,
                 generator=torch.manual_seed(0))
        stages = STAGE_TIMER.collect()
    finally:
        STAGE_TIMER.enabled = False
    assert len(stages["denoising_step"]) == 3 and len(stages["prompt_encoding"]) == 1
    assert len(stages["decoding"]) == 1 and len(stages["postprocessing"]) == 1
    assert all(t > 0 for values in stages.values() for t in values)
    assert len(calls) == 3
    assert pipe.transformer.forward is installed_forward  # put back, not deleted
    assert "encode_prompt" not in vars(pipe) and "decode" not in vars(pipe.vae)  # methods uncovered again


@pytest.mark.parametrize("name, kind", [
    # names as torch.profiler printed them on the H100
    ("nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1", "attention"),
    ("_sparse_attention_kernel", "attention"),
    ("triton_poi_fused__scaled_mm__to_copy_cat_clamp_div_gelu_1", "fused (inductor)"),
    ("triton_red_fused__fused_rms_norm__to_copy_add_fa3_attention_2", "fused (inductor)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_kernel_kind_sorts_profiler_names(name, kind):
    assert benchmark_utils.kernel_kind(name) == kind


def test_device_kernel_times_is_empty_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the times are measured, not empty")
    calls = []
    assert benchmark_utils.device_kernel_times(lambda: calls.append(1)) == []
    assert calls == []  # nothing is run when there is no device time to split


def test_ms_by_kind_sums_kernels_per_kind_largest_first():
    kernels = [{"kernel": "nvjet_gemm", "kind": "matmul", "ms": 2.0, "calls": 1},
               {"kernel": "triton_poi_fused_gelu_0", "kind": "fused (inductor)", "ms": 1.5, "calls": 2},
               {"kernel": "cutlass_scaled_mm", "kind": "matmul", "ms": 0.25, "calls": 1},
               {"kernel": "triton_red_fused_amax_1", "kind": "fused (inductor)", "ms": 1.0, "calls": 1}]
    assert list(benchmark_utils.ms_by_kind(kernels).items()) == [("fused (inductor)", 2.5), ("matmul", 2.25)]

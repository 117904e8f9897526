import torch

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

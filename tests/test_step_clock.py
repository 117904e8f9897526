import torch

from utils.flux_builders import build_tiny_pipeline
from utils.step_clock import StepClock


def test_step_clock_follows_the_pipeline_loop_across_generations():
    pipe = build_tiny_pipeline()
    clock = StepClock(pipe.scheduler)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append((clock.step, clock.at_first_step,
                                                                          clock.num_steps)))
    for steps in (5, 3):
        pipe("a cat", height=64, width=64, num_inference_steps=steps, max_sequence_length=32,
             generator=torch.manual_seed(0), output_type="latent")
    assert seen == [(i, i == 0, 5) for i in range(5)] + [(i, i == 0, 3) for i in range(3)]

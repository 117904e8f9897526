"""Helpers shared by the Chipmunk tests: the tiny config, a generation on the tiny pipeline, a stand-in scheduler."""

import types
from pathlib import Path

import torch
import yaml

from utils.benchmark_utils import pipeline_call_kwargs
from utils.pipeline_utils import load_pipeline, optimize, validate_args
from utils.step_clock import StepClock

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs/chipmunk-tiny.yml")
FLUX_CONFIG = str(ROOT / "configs/chipmunk-flux.yml")
STEPS = 6  # tiny config, full_step_every 4: attention dense 0,1,4; MLP dense 0,4, reselect 1,3,5


def rel(x, ref):
    return float((x - ref).norm() / ref.norm())


def latents(make_args, *extra, steps=STEPS):
    """One generation of the tiny pipeline (float32, CPU) with the stack the flags describe: (latents, pipeline)."""
    args = make_args("--disable_bf16", "--num_inference_steps", str(steps), *extra)
    validate_args(args)
    pipe = load_pipeline(args)
    optimize(pipe, args)
    out = pipe(**pipeline_call_kwargs(args), generator=torch.manual_seed(args.seed), output_type="latent").images
    return out, pipe


def write_config(tmp_path, **sections):
    """The tiny config with `sections` merged in, written to a file: its path."""
    cfg = yaml.safe_load(Path(TINY_CONFIG).read_text())
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "chipmunk.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


class ManualClock(StepClock):
    """A StepClock over a stand-in scheduler whose step the test sets: `clock.at(step)` (step 0 is a generation's
    first step, as the pipeline's scheduler reports it with step_index None)."""

    def __init__(self):
        super().__init__(types.SimpleNamespace(step_index=None, timesteps=[]))

    def at(self, step: int) -> "ManualClock":
        self.scheduler.step_index = None if step == 0 else step
        return self

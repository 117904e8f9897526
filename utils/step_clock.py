"""Which denoising step the transformer is running, read from the pipeline's scheduler.

Caching and Chipmunk schedules hang on this, never on a count of module calls: the reference
Chipmunk+HiCache integration counted calls, and the count drifted once cached steps skipped modules
(see ALGORITHMS.md section 4). diffusers' Flux pipelines call `scheduler.set_timesteps` (which sets
`step_index` to None) before the loop, and `scheduler.step` after each transformer call, so during
the transformer call of step i, `step_index` is None for i == 0 and i otherwise.
"""

from __future__ import annotations


class StepClock:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        # The step on the device, for code replayed from a CUDA graph (which runs no Python): whoever replays keeps
        # it current (utils.chipmunk_graphs.ChipmunkStepGraphs); None when nothing does.
        self.step_tensor = None

    @property
    def step(self) -> int:
        index = self.scheduler.step_index
        return 0 if index is None else int(index)

    @property
    def num_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def at_first_step(self) -> bool:
        """True during the first transformer call of a generation: the moment to reset all state."""
        return self.scheduler.step_index is None

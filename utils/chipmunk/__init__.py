"""Chipmunk: dynamic column-sparse deltas for FLUX, layer 3 of the stack (`--chipmunk_config`).

Activations change slowly across denoising steps. On a dense step a layer caches its output; on a sparse step it
recomputes only the most important columns (attention keys, MLP neurons) and adds their change to the cached output.
docs/ALGORITHMS.md gives the formulas.

    config.py     the YAML config (Chipmunk's keys) and the schedule it implies
    reference.py  the math in plain PyTorch: what the kernels must compute, and the CPU path
    kernels.py    the Triton kernels (Hopper)
    layers.py     the sparse attention and MLP layers, their caches, and the custom ops compiled blocks call
    flux.py       the FLUX wiring: token reorder, the double blocks' image MLP, the single block
    graphs.py     CUDA graphs per step kind (--compile_mode reduce-overhead)
"""

from utils.chipmunk.config import ChipmunkConfig, load_chipmunk_config
from utils.chipmunk.flux import apply_chipmunk, apply_chipmunk_config, chipmunk_stats

__all__ = ["ChipmunkConfig", "apply_chipmunk", "apply_chipmunk_config", "chipmunk_stats", "load_chipmunk_config"]

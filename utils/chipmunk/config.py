"""Chipmunk's config (the keys of Chipmunk's `chipmunk-config.yml`) and the schedule it implies.

Every schedule here is a function of the denoising step index (StepClock) and the config alone, never of a count of
calls: a layer that feature caching skips on a forecast step still agrees with the others about what comes next.
docs/ALGORITHMS.md gives the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from utils.errors import StackError

FLUX_PIXELS_PER_TOKEN = 16  # VAE downsamples 8x, then 2x2 latent patches are packed into one token


@dataclass
class MlpConfig:
    is_enabled: bool = True
    top_keys: float = 0.3  # fraction of fc1 neurons recomputed per token block
    random_keys: float = 0.05  # extra fraction chosen at random (exploration)
    full_step_every: int = 10
    block_mask_cache: int = 2  # reselect neurons every this many sparse steps
    first_n_dense_layers: int = 2
    counts_multiple_of: int = 256  # neuron count padded to the kernel tile multiple
    bm: int = 128  # tokens per block that share one neuron set ("MLP token block")
    mbm: int = 128  # Chipmunk's kernel sub-tile; accepted for compatibility, unused here
    is_fp8: bool = False  # fc1 and fc2 in float8 e4m3 with per-row scales (layers.SparseMlp)


@dataclass
class AttnConfig:
    is_enabled: bool = True
    top_keys: float = 0.165  # fraction of key columns per query group
    full_step_every: int = 10
    full_step_schedule: list[int] | None = None  # if set, replaces "0, 1 and every full_step_every"
    first_n_dense_layers: int = 2
    counts_multiple_of: int = 128  # key count padded to the kernel tile multiple
    mbm: int = 192  # queries per group that share one key set ("query group")
    random_keys: float = 0.0
    recompute_mask: bool = True


@dataclass
class PatchifyConfig:
    is_enabled: bool = True
    chunk_size_1: int = 8  # outer patch side, in tokens
    chunk_size_2: int = 4  # inner sub-patch side, in tokens


@dataclass
class ChipmunkConfig:
    mlp: MlpConfig = field(default_factory=MlpConfig)
    attn: AttnConfig = field(default_factory=AttnConfig)
    patchify: PatchifyConfig = field(default_factory=PatchifyConfig)


SECTIONS = {"mlp": MlpConfig, "attn": AttnConfig, "patchify": PatchifyConfig}
IGNORED_SECTIONS = ("offloading",)  # CPU offload of Chipmunk's caches: memory placement only, not implemented


def load_chipmunk_config(path: str | Path | None = None, height: int | None = None, width: int | None = None,
                         pixels_per_token: int = FLUX_PIXELS_PER_TOKEN,
                         overrides: dict[str, dict[str, Any]] | None = None) -> ChipmunkConfig:
    """Read and validate a Chipmunk YAML (keys of Chipmunk's chipmunk-config.yml; missing keys take the
    published FLUX values). Raises StackError naming the fix for unknown keys, top_keys outside (0, 1],
    and image sizes the token reorder cannot tile."""
    raw: dict[str, Any] = {}
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise StackError(f"--chipmunk_config {path}: no such file (see configs/chipmunk-flux.yml)")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise StackError(f"--chipmunk_config {path}: expected a mapping of sections (mlp, attn, patchify)")
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    where = f"--chipmunk_config {path}" if path else "chipmunk config"

    config = ChipmunkConfig()
    for section, values in raw.items():
        if section in IGNORED_SECTIONS:
            continue
        if section not in SECTIONS:
            raise StackError(f"{where}: unknown section {section!r}; allowed: {', '.join(SECTIONS)} "
                             f"(and {', '.join(IGNORED_SECTIONS)}, ignored). Remove or rename it.")
        cls = SECTIONS[section]
        allowed = {f.name for f in fields(cls)}
        for key, value in (values or {}).items():
            if key not in allowed:
                raise StackError(f"{where}: unknown key {section}.{key}; allowed in {section}: "
                                 f"{', '.join(sorted(allowed))}. Remove or rename it.")
            setattr(getattr(config, section), key, value)

    for section in ("mlp", "attn"):
        sec = getattr(config, section)
        if not isinstance(sec.top_keys, (int, float)) or isinstance(sec.top_keys, bool) or not 0 < sec.top_keys <= 1:
            raise StackError(f"{where}: {section}.top_keys must be a fraction in (0, 1], got {sec.top_keys!r} "
                             f"(1.0 = sparsity off; the published FLUX values are mlp 0.3, attn 0.165)")
        if not 0 <= sec.random_keys < 1:
            raise StackError(f"{where}: {section}.random_keys must be in [0, 1), got {sec.random_keys!r}")
        for key in ("full_step_every", "counts_multiple_of", "mbm"):
            if not isinstance(getattr(sec, key), int) or getattr(sec, key) < 1:
                raise StackError(f"{where}: {section}.{key} must be a positive integer, got {getattr(sec, key)!r}")
        if sec.first_n_dense_layers < 0:
            raise StackError(f"{where}: {section}.first_n_dense_layers must be >= 0")
    if not isinstance(config.mlp.is_fp8, bool):
        raise StackError(f"{where}: mlp.is_fp8 must be true or false, got {config.mlp.is_fp8!r}")
    if config.attn.random_keys:
        raise StackError(f"{where}: attn.random_keys is not implemented here (FLUX's config has none); set it to 0")
    if config.mlp.block_mask_cache < 1 or config.mlp.bm < 1:
        raise StackError(f"{where}: mlp.block_mask_cache and mlp.bm must be positive integers")
    p = config.patchify
    if p.chunk_size_1 < 1 or p.chunk_size_2 < 1 or p.chunk_size_1 % p.chunk_size_2:
        raise StackError(f"{where}: patchify.chunk_size_1 ({p.chunk_size_1}) must be a positive multiple of "
                         f"patchify.chunk_size_2 ({p.chunk_size_2})")
    if height is not None and width is not None and p.is_enabled:
        side = p.chunk_size_1 * pixels_per_token
        if height % side or width % side:
            def near(v: int) -> str:
                return f"{max(side, v // side * side)} or {(v // side + 1) * side}"
            raise StackError(f"Chipmunk's token reorder tiles the image into {p.chunk_size_1}x{p.chunk_size_1}-token "
                             f"patches, so --height and --width must be multiples of {side} px; got "
                             f"{height}x{width}. Use e.g. --height {near(height)} / --width {near(width)}, or "
                             f"--disable_chipmunk.")
    return config


def rounded_count(fraction: float, total: int, multiple: int) -> int:
    """`fraction * total` rounded to the nearest kernel tile multiple, at least one tile, at most `total`."""
    return min(total, max(multiple, int(round(fraction * total / multiple)) * multiple))


# --- schedule --------------------------------------------------------------------------------------

def attn_dense_step(step: int, config: AttnConfig) -> bool:
    if config.full_step_schedule is not None:
        return step in set(config.full_step_schedule)
    return step < 2 or step % config.full_step_every == 0


def mlp_dense_step(step: int, config: MlpConfig) -> bool:
    return step % config.full_step_every == 0


def mlp_reselect_step(step: int, config: MlpConfig) -> bool:
    """The first sparse step after each dense step, then every `block_mask_cache` steps."""
    since_dense = step % config.full_step_every
    return since_dense >= 1 and (since_dense - 1) % config.block_mask_cache == 0


def due_since(last_step: int | None, step: int, scheduled) -> bool:
    """Whether `scheduled(t)` holds for a step t in (last_step, step]: a refresh that fell on a step this
    layer did not compute (a feature-cache forecast step) is carried out on the next one it computes."""
    if last_step is None:
        return True
    return any(scheduled(t) for t in range(last_step + 1, step + 1))


def attention_decision(step: int, last: int | None, config: AttnConfig, has_keys: bool) -> tuple[bool, bool]:
    """(dense step, selects a new key set) for an attention layer at `step`, `last` being the last step it computed
    (None: the first of a generation) and `has_keys` whether it holds a key set from this generation."""
    dense = due_since(last, step, lambda t: attn_dense_step(t, config))
    return dense, dense and (config.recompute_mask or last is None or not has_keys)


def mlp_decision(step: int, last: int | None, config: MlpConfig, has_neurons: bool) -> tuple[bool, bool]:
    """(dense step, reselects its neurons) for an MLP layer at `step`; `has_neurons`: whether it holds a neuron set
    chosen against its current reference (a dense step makes a new reference)."""
    dense = due_since(last, step, lambda t: mlp_dense_step(t, config))
    fresh = last is None or not has_neurons
    return dense, not dense and (fresh or due_since(last, step, lambda t: mlp_reselect_step(t, config)))

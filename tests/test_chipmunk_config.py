"""Chipmunk's config (utils/chipmunk/config.py): loading and validation of Chipmunk's YAML keys, the published FLUX
values, and the schedule they imply (dense steps, MLP reselections, the deferred-dense rule, the per-step decisions)."""

import re

import pytest
import torch

from chipmunk_support import FLUX_CONFIG, TINY_CONFIG, write_config
from utils.chipmunk import config as C
from utils.errors import StackError
from utils.pipeline_utils import StackError as PipelineStackError
from utils.pipeline_utils import validate_args


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sections, message", [
    ({"mlp": {"top_k": 0.3}}, "unknown key mlp.top_k"),
    ({"attention": {"top_keys": 0.2}}, "unknown section 'attention'"),
    ({"attn": {"top_keys": 0.0}}, "attn.top_keys must be a fraction in (0, 1]"),
    ({"mlp": {"top_keys": 1.5}}, "mlp.top_keys must be a fraction in (0, 1]"),
    ({"mlp": {"top_keys": "dd"}}, "mlp.top_keys must be a fraction in (0, 1]"),
])
def test_bad_config_is_refused_with_the_fix(make_args, tmp_path, sections, message):
    path = write_config(tmp_path, **sections)
    with pytest.raises(StackError, match=re.escape(message)):
        validate_args(make_args("--chipmunk_config", path))


@pytest.mark.parametrize("overrides, message", [
    ({"mlp": {"random_keys": 1.0}}, "mlp.random_keys must be in [0, 1), got 1.0"),
    ({"attn": {"mbm": 0}}, "attn.mbm must be a positive integer, got 0"),
    ({"mlp": {"full_step_every": 2.5}}, "mlp.full_step_every must be a positive integer, got 2.5"),
    ({"attn": {"first_n_dense_layers": -1}}, "attn.first_n_dense_layers must be >= 0"),
    ({"mlp": {"is_fp8": "yes"}}, "mlp.is_fp8 must be true or false, got 'yes'"),
    ({"attn": {"random_keys": 0.1}}, "attn.random_keys is not implemented here"),
    ({"mlp": {"block_mask_cache": 0}}, "mlp.block_mask_cache and mlp.bm must be positive integers"),
    ({"patchify": {"chunk_size_1": 6, "chunk_size_2": 4}},
     "patchify.chunk_size_1 (6) must be a positive multiple of patchify.chunk_size_2 (4)"),
])
def test_values_the_code_cannot_run_are_refused_naming_the_key(overrides, message):
    with pytest.raises(StackError, match=re.escape(message)):
        C.load_chipmunk_config(TINY_CONFIG, overrides=overrides)


def test_the_float8_flux_config_is_the_published_one_with_its_mlp_in_float8():
    import dataclasses

    published = dataclasses.asdict(C.load_chipmunk_config(FLUX_CONFIG))
    published["mlp"]["is_fp8"] = True
    assert dataclasses.asdict(C.load_chipmunk_config(FLUX_CONFIG.replace(".yml", "-fp8.yml"))) == published


def test_float8_mlp_is_refused_on_a_gpu_without_float8_matmuls(make_args, tmp_path, monkeypatch):
    path = write_config(tmp_path, mlp={"is_fp8": True})
    assert C.load_chipmunk_config(path).mlp.is_fp8 is True
    validate_args(make_args("--chipmunk_config", path))  # CPU: the float8 values, multiplied in float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # validation only: nothing runs
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(StackError, match=r"mlp\.is_fp8 needs float8 matmuls \(an sm_89\+ GPU"):
        validate_args(make_args("--chipmunk_config", path, "--device", "cuda"))


def test_image_size_not_tiled_by_patches_is_refused(make_args):
    with pytest.raises(StackError, match=r"multiples of 128 px; got 1008x1024\. Use e\.g\. --height 896 or 1024"):
        validate_args(make_args("--chipmunk_config", FLUX_CONFIG, "--height", "1008", "--width", "1024"))
    with pytest.raises(StackError, match="no such file"):
        validate_args(make_args("--chipmunk_config", "nope.yml"))


def test_stack_error_is_still_the_pipeline_layers_error():
    assert PipelineStackError is StackError and issubclass(StackError, ValueError)


def test_offloading_section_is_ignored_and_missing_keys_take_the_published_values(tmp_path):
    path = tmp_path / "chipmunk.yml"
    path.write_text("offloading: {global_disable_offloading: true}\nattn: {top_keys: 0.2}\n")
    cfg = C.load_chipmunk_config(path)
    assert cfg.attn.top_keys == 0.2 and cfg.attn.mbm == 192 and cfg.mlp == C.MlpConfig()
    assert C.load_chipmunk_config() == C.ChipmunkConfig()  # no file: every default


def test_published_flux_config_values():
    cfg = C.load_chipmunk_config(FLUX_CONFIG, height=768, width=1280)
    assert (cfg.mlp.top_keys, cfg.mlp.random_keys, cfg.mlp.full_step_every, cfg.mlp.block_mask_cache) == (0.3, 0.05, 10, 2)
    assert (cfg.attn.top_keys, cfg.attn.full_step_every, cfg.attn.mbm, cfg.mlp.bm) == (0.165, 10, 192, 128)
    assert (cfg.patchify.chunk_size_1, cfg.patchify.chunk_size_2) == (8, 4)
    assert C.rounded_count(0.165, 512 + 48 * 80, 128) == 768  # keys per query group at 1280x768
    assert C.rounded_count(0.35, 12288, 256) == 4352  # neurons per token block


# --- schedule -------------------------------------------------------------------------------------

def test_deferred_dense_rule():
    due = C.due_since
    dense = lambda t: C.attn_dense_step(t, C.AttnConfig(full_step_every=10))  # noqa: E731
    assert due(None, 5, dense)  # nothing cached yet
    assert [due(t - 1, t, dense) for t in range(12)] == [t in (0, 1, 10) for t in range(12)]  # every step computed
    assert due(8, 15, dense) and not due(15, 19, dense) and due(15, 22, dense)  # 10 -> 15, 20 -> 22


def test_dense_and_reselect_steps_of_the_published_schedule():
    attn, mlp = C.AttnConfig(), C.MlpConfig()
    assert [t for t in range(25) if C.attn_dense_step(t, attn)] == [0, 1, 10, 20]
    assert [t for t in range(25) if C.mlp_dense_step(t, mlp)] == [0, 10, 20]
    # the first sparse step after each dense one, then every block_mask_cache (2) sparse steps
    assert [t for t in range(25) if C.mlp_reselect_step(t, mlp)] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    assert [t for t in range(12) if C.mlp_reselect_step(t, C.MlpConfig(full_step_every=6, block_mask_cache=3))] \
        == [1, 4, 7, 10]
    explicit = C.AttnConfig(full_step_schedule=[0, 3, 7])
    assert [t for t in range(10) if C.attn_dense_step(t, explicit)] == [0, 3, 7]


def plain_kinds(config, steps, computed=None):
    """(attention dense, attention selects keys, MLP dense, MLP reselects) per step, from attention_decision and
    mlp_decision with the flags a layer keeps, when the steps in `computed` (default: every step) are computed."""
    kinds, last, has_keys, has_neurons = [], None, False, False
    for t in range(steps):
        if computed is not None and t not in computed:
            kinds.append(None)
            continue
        attn_dense, keys = C.attention_decision(t, last, config.attn, has_keys)
        mlp_dense, reselect = C.mlp_decision(t, last, config.mlp, has_neurons)
        has_keys = has_keys or keys
        has_neurons = (has_neurons or reselect) and not mlp_dense
        kinds.append((attn_dense, keys, mlp_dense, reselect))
        last = t
    return kinds


def test_step_kind_of_the_tiny_schedule():
    """(attention dense, attention selects keys, MLP dense, MLP reselects) per step: full_step_every 4,
    block_mask_cache 2."""
    config = C.load_chipmunk_config(TINY_CONFIG)
    kinds = plain_kinds(config, 9)
    assert kinds == [(True, True, True, False), (True, True, False, True), (False, False, False, False),
                     (False, False, False, True), (True, True, True, False), (False, False, False, True),
                     (False, False, False, False), (False, False, False, True), (True, True, True, False)]


def test_step_kind_selects_keys_once_per_generation_without_recompute_mask():
    config = C.ChipmunkConfig()
    config.attn.recompute_mask = False
    kinds = plain_kinds(config, 21)
    assert [t for t, k in enumerate(kinds) if k[0]] == [0, 1, 10, 20]
    assert [t for t, k in enumerate(kinds) if k[1]] == [0]  # a step-0 graph differs from a step-10 one


def test_step_kind_makes_a_generations_first_step_dense_whatever_the_schedule():
    config = C.ChipmunkConfig()
    config.attn.full_step_schedule = [5]
    kinds = plain_kinds(config, 6)
    assert kinds[0][:3] == (True, True, True) and not kinds[1][0]
    assert kinds[5][:2] == (True, True)


def test_decisions_under_caching_follow_the_deferred_schedule():
    """With feature caching only full steps compute: a dense step or reselection scheduled on a forecast step
    happens at the next full one (tiny schedule; full steps 0, 1, 2, 5, 8 of HiCache at interval 3)."""
    config = C.load_chipmunk_config(TINY_CONFIG)
    kinds = plain_kinds(config, 9, computed={0, 1, 2, 5, 8})
    assert kinds[5] == (True, True, True, False)  # attention and MLP dense at 4 -> 5
    assert kinds[8] == (True, True, True, False) and kinds[3] is None

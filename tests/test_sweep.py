"""utils/sweep.py without generating images: config validation, the work list and its shards, JSONL
records (torn lines), merge status, FLOP counts from the caching layer."""

import json

import pytest
import yaml

from utils import sweep

SMALL = {"output_dir": "OUT", "base": {"ckpt": "tiny", "disable_bf16": True, "num_inference_steps": 2},
         "baseline": "none", "variants": [{"name": "none"}, {"name": "taylor", "flags": {"cache_mode": "taylor"}}],
         "prompts": {"spec": "default", "limit": 3}, "seeds_per_prompt": 2}


def write_config(tmp_path, **changes):
    raw = {**SMALL, "output_dir": str(tmp_path / "out"), **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_valid_config_resolves_each_variant_command_line(tmp_path):
    config = sweep.load_config(write_config(tmp_path), base_overrides=["num_inference_steps=3"])
    assert [v.name for v in config.variants] == ["none", "taylor"]
    assert config.variant("taylor").argv == ["--ckpt", "tiny", "--disable_bf16", "--num_inference_steps", "3",
                                             "--cache_mode", "taylor"]
    assert config.seeds == [0, 1] and config.prompt_limit == 3 and config.variant("none").stack_error is None


@pytest.mark.parametrize("changes, message", [
    ({"variantz": []}, "unknown key 'variantz' (did you mean 'variants'?)"),
    ({"variants": [{"name": "none", "flags": {"cache_mod": "taylor"}}]}, "variant 'none': unknown flag 'cache_mod' (did you mean 'cache_mode'?)"),
    ({"variants": [{"name": "none", "flags": {"cache_mode": "magic"}}]}, "invalid choice: 'magic'"),
    ({"variants": [{"name": "none", "flags": {"interval": "often"}}]}, "invalid int value: 'often'"),
    ({"variants": [{"name": "none", "flags": {"disable_fa3": "yes"}}]}, "is a switch, give true or false"),
    ({"variants": [{"name": "none", "flagz": {}}]}, "variants[0]: unknown key 'flagz'"),
    ({"base": {"prompt": "a cat"}}, "flag 'prompt' is set by the sweep"),
    ({"baseline": "dense"}, "baseline 'dense' is not one of the variants"),
    ({"variants": [{"name": "none"}, {"name": "none"}]}, "variant name 'none' appears twice"),
    ({"variants": [{"name": "has space"}]}, "needs a name of letters"),
    ({"metrics": ["psnr", "fidd"]}, "unknown metric 'fidd'"),
    ({"report": {"pareto_metrics": ["lpips"]}}, "'lpips' is not among the config's metrics"),
    ({"interval1_check": {"tolerence": 1}}, "interval1_check: unknown key 'tolerence'"),
])
def test_bad_config_names_the_bad_key(tmp_path, changes, message):
    with pytest.raises(sweep.ConfigError) as err:
        sweep.load_config(write_config(tmp_path, **changes))
    assert message in str(err.value)


def test_variant_invalid_on_this_machine_is_kept_with_its_error(tmp_path):
    path = write_config(tmp_path, variants=[{"name": "none"},
                                            {"name": "aoti", "flags": {"compile_export_mode": "export_aoti"}}])
    config = sweep.load_config(path)
    assert "export_aoti needs CUDA" in config.variant("aoti").stack_error  # recorded as failed at run time


def test_shards_split_prompt_seed_pairs_disjointly_and_completely(tmp_path):
    config = sweep.load_config(write_config(tmp_path))
    full = sweep.work_list(config, num_prompts=3)
    assert len(full) == 2 * 3 * 2
    shards = [sweep.work_list(config, 3, (i, 3)) for i in range(3)]
    keys = [it.key for shard in shards for it in shard]
    assert sorted(keys) == sorted(it.key for it in full) and len(set(keys)) == len(keys)
    for shard in shards:  # every variant of a shard has the same (prompt, seed) pairs: baselines stay local
        pairs = {v.name: [(it.prompt_index, it.seed) for it in shard if it.variant == v.name] for v in config.variants}
        assert pairs["none"] == pairs["taylor"] and len(pairs["none"]) == 2
    assert sweep.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1-2"):
        with pytest.raises(ValueError):
            sweep.parse_shard(bad)


def test_torn_last_line_is_skipped_and_cut_before_appending(tmp_path):
    path = tmp_path / "records" / "shard-0-of-1.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"key": "a"}) + "\n" + json.dumps({"key": "b"}) + "\n" + '{"key": "c", "lat')
    assert [r["key"] for r in sweep.read_jsonl(path)] == ["a", "b"]
    writer = sweep.RecordWriter(tmp_path, (0, 1))
    writer.submit_record({"key": "d"})
    writer.close()
    assert [r["key"] for r in sweep.read_jsonl(path)] == ["a", "b", "d"]
    assert path.read_text().count("\n") == 3


def test_merge_reports_ok_failed_and_incomplete_variants(tmp_path):
    config = sweep.load_config(write_config(tmp_path, variants=[
        {"name": "none"}, {"name": "taylor", "flags": {"cache_mode": "taylor"}},
        {"name": "hicache", "flags": {"cache_mode": "hicache"}}]))
    prompts = [{"prompt": f"p{i}"} for i in range(3)]
    writer = sweep.RecordWriter(config.output_dir, (0, 1))
    from PIL import Image

    for item in sweep.work_list(config, 3):
        if item.variant == "taylor" and item.prompt_index == 2:
            continue  # taylor failed on its last prompt; hicache has one image
        if item.variant == "hicache" and (item.prompt_index, item.seed) != (0, 0):
            continue
        writer.submit(Image.new("RGB", (8, 8)), {"key": item.key, "status": "ok", "variant": item.variant,
                                                 "image": item.image, "argv": []})
    writer.submit_record({"key": "taylor/failed", "status": "failed", "variant": "taylor",
                          "error": "OutOfMemoryError: CUDA out of memory"})
    writer.close()
    merged = sweep.merge_records(config, prompts)
    assert merged.status == {"none": "ok", "taylor": "failed: OutOfMemoryError: CUDA out of memory",
                             "hicache": "incomplete (1/6)"}
    assert len(merged.records) == 6 + 4 + 1
    assert len(sweep.read_jsonl(config.output_dir / "records.jsonl")) == 11


def test_flop_counts_come_from_the_caching_layer_when_present():
    class FakeCache:
        def stats(self):
            return {"full_steps": 12, "forecast_steps": 38, "flops_speedup": 4.0}

    class FakeTransformer:
        harness_cache = FakeCache()

    class FakePipeline:
        transformer = FakeTransformer()

    args = type("Args", (), {"num_inference_steps": 50})()
    counts = sweep.cache_counts(FakePipeline(), args, dense_forward_flops=10)
    assert (counts["full_steps"], counts["forecast_steps"], counts["flops_dense"], counts["flops"]) == (12, 38, 500, 125)
    FakeTransformer.harness_cache = None
    counts = sweep.cache_counts(FakePipeline(), args, dense_forward_flops=10)
    assert (counts["full_steps"], counts["forecast_steps"], counts["flops"], counts["flops_speedup"]) == (50, 0, 500, 1.0)


def test_resume_refuses_a_variant_whose_flags_changed(tmp_path):
    config = sweep.load_config(write_config(tmp_path))
    old = {"key": "taylor/p0000_s0", "status": "ok", "variant": "taylor", "argv": ["--ckpt", "tiny", "--cache_mode", "fora"]}
    with pytest.raises(sweep.ConfigError, match="variant 'taylor' was generated .* with flags '--ckpt tiny --cache_mode fora'"):
        sweep.check_flags_unchanged(config, [old])
    sweep.check_flags_unchanged(config, [{**old, "argv": config.variant("taylor").argv}])  # same flags: resumes

"""Feature caching on the tiny pipeline (CPU, fp32): schedule, finite differences, forecasts (fora, taylor, hicache),
interval=1 equal to no cache, FBCache, validation, plus interval > 1, batch 2, stats(), regional compile and
cache-dit."""

import math
import sys
from pathlib import Path

import pytest
import torch

from utils import caching
from utils.benchmark_utils import pipeline_call_kwargs
from utils.caching import (attach_cache, combine, difference_weights, forecast_coefficients, forecast_image_stream,
                           forecast_weights, hermite, is_full_step, predict, update_differences, validate_cache_args)
from utils.pipeline_utils import StackError, load_pipeline, optimize, validate_args

TINY_HIDDEN, TINY_IMAGE_TOKENS, TINY_TEXT_TOKENS = 32, 256, 32
KONTEXT_IMAGE = Path(__file__).resolve().parent / "fixtures/edits/gradient.png"


def generate(make_args, *flags, steps=6, prompt="a red cat", batch=1, pipe=None):
    args = validate_args(make_args("--disable_bf16", "--num_inference_steps", str(steps), "--prompt", prompt, *flags))
    if pipe is None:
        pipe = optimize(load_pipeline(args), args)
    images = pipe(**pipeline_call_kwargs(args), num_images_per_prompt=batch, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    return pipe, images


# --- 1. interval=1 equals no caching, bitwise ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["taylor", "hicache"])
def test_interval_one_is_bitwise_identical_to_no_cache(make_args, mode):
    _, reference = generate(make_args, "--cache_mode", "none")
    pipe, cached = generate(make_args, "--cache_mode", mode, "--interval", "1")
    assert torch.equal(reference, cached)
    stats = pipe.transformer.harness_cache.stats()
    assert (stats["full_steps"], stats["forecast_steps"]) == (6, 0)


# --- 2. schedule ----------------------------------------------------------------------------------

def expected_full_steps(num_steps, interval, first_enhance):  # ALGORITHMS.md 1, written out independently
    return sorted(set(range(first_enhance)) | set(range(first_enhance - 1, num_steps, interval)))


def test_schedule_50_steps_first_enhance_3(make_args):
    pipe, _ = generate(make_args, "--cache_mode", "taylor", steps=1)  # one pipeline; parameters switched below
    for interval, count in ((5, 12), (6, 10), (7, 9)):
        attach_cache(pipe, "taylor", interval=interval)
        generate(make_args, steps=50, pipe=pipe)
        stats = pipe.transformer.harness_cache.stats()
        full = [i for i, kind in enumerate(stats["step_kinds"]) if kind == "F"]
        assert full == expected_full_steps(50, interval, 3) and len(full) == count
        assert (stats["full_steps"], stats["forecast_steps"]) == (count, 50 - count)
        # the pure rule agrees
        last, pure = None, []
        for s in range(50):
            if is_full_step(s, last, interval, 3):
                pure.append(s)
                last = s
        assert pure == full


# --- 3. forecasts against an independent fp64 oracle ----------------------------------------------

def oracle_run(feature_at, full_steps, forecast_step, max_order, first_enhance, mode, scale=0.6):
    """TaylorSeer/HiCache reference style: dict of factors, quirk `step > fe - 2`, explicit sums."""
    factors, activated = {}, []
    for s in full_steps:
        activated.append(s)
        d = activated[-1] - activated[-2] if len(activated) > 1 else 1
        new = {0: feature_at(s)}
        for i in range(max_order):
            if factors.get(i) is not None and s > first_enhance - 2:
                new[i + 1] = (new[i] - factors[i]) / d
            else:
                break
        factors = new
    x = forecast_step - activated[-1]
    if mode == "taylor":
        return sum(factors[i] * x ** i / math.factorial(i) for i in factors), factors
    herm = {0: lambda y: 1.0, 1: lambda y: 2 * y, 2: lambda y: 4 * y * y - 2, 3: lambda y: 8 * y ** 3 - 12 * y}
    return factors[0] + sum(factors[i] * herm[i](scale * x) * scale ** i / math.factorial(i)
                            for i in factors if i > 0), factors


def harness_run(feature_at, full_steps, forecast_step, max_order, first_enhance, mode, scale=0.6):
    orders, last = None, None
    for s in full_steps:
        previous = orders if s > first_enhance - 2 else None
        orders = update_differences(previous, feature_at(s), s - last if last is not None else 1, max_order)
        last = s
    coeffs = torch.tensor(forecast_coefficients(mode, forecast_step - last, len(orders), scale), dtype=torch.float64)
    return predict(orders, coeffs), orders


def random_polynomial(degree, seed):
    g = torch.Generator().manual_seed(seed)
    coefficients = [torch.randn(3, 7, dtype=torch.float64, generator=g) for _ in range(degree + 1)]
    return coefficients, lambda s: sum(c * float(s) ** j for j, c in enumerate(coefficients))


@pytest.mark.parametrize("mode", ["taylor", "hicache"])
def test_harness_recurrence_matches_oracle_with_reference_quirk(mode):
    _, feature_at = random_polynomial(4, seed=1)
    full = expected_full_steps(50, 5, 3)[:6]  # 0, 1, 2, 7, 12, 17: d = 1 then 5 (the quirk)
    for step in (18, 19, 21):
        ours, _ = harness_run(feature_at, full, step, 2, 3, mode)
        oracle, _ = oracle_run(feature_at, full, step, 2, 3, mode)
        torch.testing.assert_close(ours, oracle, rtol=1e-12, atol=1e-9)


def ring_run(feature_at, full_steps, forecast_step, max_order, first_enhance, mode, scale=0.6):
    """The cache's form: each full step's features into a ring of max_order + 1 buffers, the differences as weights
    of them (difference_weights, with the harness's reset and count rules), the forecast as one weighted sum."""
    size = max_order + 1
    ring = [torch.full((3, 7), float("nan"), dtype=torch.float64) for _ in range(size)]  # unwritten: never read
    orders, last, position, count = [], None, 0, 0
    for s in full_steps:
        reset = count == 0 or s <= first_enhance - 2
        count = 1 if reset else 1 + min(max_order, count)
        position = 0 if reset else (position + 1) % size
        ring[position] = feature_at(s)
        orders = difference_weights(orders, position, float(s - last if last is not None else 1), count, size)
        last = s
    weights = forecast_weights(mode, forecast_step - last, orders, scale)
    assert all(w == 0 for w in weights[count:])  # the valid features are the first `count` buffers
    return combine(ring[:count], torch.tensor(weights[:count], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["taylor", "hicache"])
@pytest.mark.parametrize("interval, first_enhance, max_order", [(5, 3, 2), (7, 3, 2), (4, 1, 3), (3, 2, 1)])
def test_the_ring_of_features_forecasts_what_the_differences_forecast(mode, interval, first_enhance, max_order):
    """The full step stores features, not differences: the differences are weights of the last max_order + 1 full
    steps' features, on the host. Against the fp64 oracle of the published recurrence, over many full steps (the
    ring wraps several times), at every forecast distance."""
    _, feature_at = random_polynomial(4, seed=interval + 10 * first_enhance)
    full = expected_full_steps(50, interval, first_enhance)
    for n_full in (1, 2, 3, 5, len(full) - 1):
        steps = full[:n_full]
        for x in range(1, interval):
            step = steps[-1] + x
            oracle, _ = oracle_run(feature_at, steps, step, max_order, first_enhance, mode)
            ours = ring_run(feature_at, steps, step, max_order, first_enhance, mode)
            torch.testing.assert_close(ours, oracle, rtol=1e-10, atol=1e-8)


def test_taylor_order_one_is_exact_on_linear_features():
    _, feature_at = random_polynomial(1, seed=2)
    full = expected_full_steps(50, 6, 3)[:5]
    for step in range(full[-1] + 1, full[-1] + 6):
        forecast, orders = harness_run(feature_at, full, step, 1, 3, "taylor")
        assert len(orders) == 2
        torch.testing.assert_close(forecast, feature_at(step), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_kth_difference_of_degree_k_polynomial_is_its_kth_derivative(degree):
    coefficients, feature_at = random_polynomial(degree, seed=3 + degree)
    d = 4
    full = [10 + d * i for i in range(degree + 2)]  # evenly spaced, past first_enhance
    _, orders = harness_run(feature_at, full, full[-1] + 1, degree, 0, "taylor")
    torch.testing.assert_close(orders[degree], math.factorial(degree) * coefficients[degree], rtol=1e-10, atol=1e-10)


def test_naive_taylor_on_quadratic_lags_by_half_a_step_as_published():
    coefficients, feature_at = random_polynomial(2, seed=7)
    d = 5
    full = [10, 10 + d, 10 + 2 * d]
    for x in (1, 2, 4):
        forecast, orders = harness_run(feature_at, full, full[-1] + x, 2, 0, "taylor")
        second = 2 * coefficients[2]
        torch.testing.assert_close(orders[2], second, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(forecast, feature_at(full[-1] + x) - second * d * x / 2, rtol=1e-10, atol=1e-9)
        assert not torch.allclose(forecast, feature_at(full[-1] + x))  # not exact: that is the method


def test_hicache_order_one_with_scale_inverse_sqrt2_equals_taylor_order_one():
    _, feature_at = random_polynomial(3, seed=11)
    full = expected_full_steps(50, 7, 3)[:4]
    for step in (full[-1] + 1, full[-1] + 3, full[-1] + 6):
        taylor, _ = harness_run(feature_at, full, step, 1, 3, "taylor")
        hicache, _ = harness_run(feature_at, full, step, 1, 3, "hicache", scale=1 / math.sqrt(2))
        torch.testing.assert_close(hicache, taylor, rtol=1e-12, atol=1e-12)
    s, x = 0.6, 3.0  # order 2 has the constant term -sigma^2 that Taylor lacks
    assert forecast_coefficients("hicache", x, 3, s)[2] == pytest.approx(2 * s ** 4 * x ** 2 - s ** 2, rel=1e-12)


def test_hermite_recurrence_matches_closed_forms():
    closed = [lambda y: 1.0, lambda y: 2 * y, lambda y: 4 * y ** 2 - 2, lambda y: 8 * y ** 3 - 12 * y,
              lambda y: 16 * y ** 4 - 48 * y ** 2 + 12]
    for y in torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).tolist():
        for n, h in enumerate(closed):
            assert hermite(n, y) == pytest.approx(h(y), rel=1e-12, abs=1e-12)


# --- 4. reset -------------------------------------------------------------------------------------

def test_second_prompt_does_not_forecast_from_the_first(make_args):
    flags = ("--cache_mode", "hicache", "--interval", "3")
    pipe, _ = generate(make_args, *flags, steps=8, prompt="a red cat")
    _, b_after_a = generate(make_args, *flags, steps=8, prompt="a blue dog", pipe=pipe)
    _, b_alone = generate(make_args, *flags, steps=8, prompt="a blue dog")
    assert torch.equal(b_after_a, b_alone)


# --- 5. FBCache -----------------------------------------------------------------------------------

@pytest.mark.parametrize("taylor", [False, True])
def test_fbcache_threshold_zero_never_skips_huge_threshold_skips_after_warmup(make_args, taylor):
    extra = ("--fbcache_taylor",) if taylor else ()
    _, reference = generate(make_args, "--cache_mode", "none", steps=8)
    pipe, never = generate(make_args, "--cache_mode", "fbcache", "--fbcache_threshold", "0", *extra, steps=8)
    assert pipe.transformer.harness_cache.stats()["step_kinds"] == "F" * 8
    assert torch.equal(never, reference)
    pipe, always = generate(make_args, "--cache_mode", "fbcache", "--fbcache_threshold", "1e9", *extra, steps=8)
    stats = pipe.transformer.harness_cache.stats()
    assert stats["step_kinds"] == "F" + "c" * 7 and stats["forecast_steps"] == 7
    assert stats["flops_forecast_step"] < stats["flops_full_step"] / 2  # block 0 only, of 6
    assert torch.isfinite(always).all() and not torch.equal(always, reference)


# --- 6. bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fix", [
    (("--interval", "0"), "--interval must be >= 1"),
    (("--max_order", "-1"), "--max_order must be >= 0"),
    (("--fbcache_threshold", "-0.1"), "--fbcache_threshold must be >= 0"),
    (("--hicache_scale", "0"), "--hicache_scale must be > 0"),
    (("--first_enhance", "-1"), "--first_enhance must be >= 0"),
])
def test_bad_values_name_the_fix(make_args, flags, fix):
    with pytest.raises(StackError, match=fix):
        validate_args(make_args("--cache_mode", "taylor", *flags))


def test_unknown_mode_and_missing_cache_dit_inputs_are_refused(make_args, monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_args("--cache_mode", "teacache")
    assert "invalid choice" in capsys.readouterr().err
    pipe = load_pipeline(make_args("--disable_bf16"))
    with pytest.raises(StackError, match="unknown cache mode"):
        attach_cache(pipe, "teacache")
    with pytest.raises(StackError, match="does not exist"):
        validate_cache_args(make_args("--cache_dit_config", str(tmp_path / "missing.yaml")))
    config = tmp_path / "c.yaml"
    config.write_text("cache_config: {}\n")
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # as if not installed
    with pytest.raises(StackError, match="pip install cache-dit"):
        validate_cache_args(make_args("--cache_dit_config", str(config)))


# --- beyond the six: forecasting is useful, batching, stats, compile, cache-dit -------------------

def test_interval_above_one_changes_the_image_but_stays_close(make_args):
    _, reference = generate(make_args, "--cache_mode", "none", steps=9)
    for mode in ("fora", "taylor", "hicache"):
        pipe, cached = generate(make_args, "--cache_mode", mode, "--interval", "3", steps=9)
        assert pipe.transformer.harness_cache.stats()["step_kinds"] == "FFFccFccF"
        error = (cached - reference).abs().mean().item()
        assert 0 < error < 0.02, (mode, error)  # images in [0, 1]


def test_batch_two_and_stats(make_args):
    _, reference = generate(make_args, "--cache_mode", "none", batch=2, steps=8)
    _, exact = generate(make_args, "--cache_mode", "taylor", "--interval", "1", batch=2, steps=8)
    assert torch.equal(exact, reference)
    pipe, cached = generate(make_args, "--cache_mode", "taylor", "--interval", "3", batch=2, steps=8)
    assert cached.shape == reference.shape == (2, 3, 64, 64)
    assert (cached - reference).abs().mean() < 0.02
    stats = pipe.transformer.harness_cache.stats()
    assert stats["step_kinds"] == "FFFccFcc" and (stats["full_steps"], stats["forecast_steps"]) == (4, 4)
    dense = 8 * stats["flops_full_step"]
    actual = 4 * stats["flops_full_step"] + 4 * stats["flops_forecast_step"]
    assert 0 < stats["flops_forecast_step"] < stats["flops_full_step"] / 10
    assert stats["flops_speedup"] == pytest.approx(dense / actual)
    # 3 stacked orders of 2 double x 2 + 4 single image features (batch 2), plus the stacked gate rows (+ bias)
    slots = 2 * 2 + 4
    features = 3 * slots * 2 * TINY_IMAGE_TOKENS * TINY_HIDDEN
    gates = slots * TINY_HIDDEN * (TINY_HIDDEN + 1)
    assert stats["cache_memory_bytes"] == (features + gates) * 4


def test_stacked_forecast_equals_the_blocks_applied_one_by_one(make_args):
    """Oracle: each block, in order, computes its full modulation and adds gate * forecast (fp64, fresh random
    features and temb); the harness's one-sum form with stacked gate rows must agree."""
    args = validate_args(make_args("--disable_bf16", "--cache_mode", "hicache", "--interval", "3"))
    pipe = optimize(load_pipeline(args), args)
    pipe.transformer.double()
    cache = pipe.transformer.harness_cache
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, TINY_IMAGE_TOKENS, TINY_HIDDEN, dtype=torch.float64, generator=g)
    temb = torch.randn(2, TINY_HIDDEN, dtype=torch.float64, generator=g)
    slots = sum(len(ids) for _, ids in cache.gate_slots)
    features = [torch.randn(slots, 2, TINY_IMAGE_TOKENS, TINY_HIDDEN, dtype=torch.float64, generator=g)
                for _ in range(3)]
    weights = torch.randn(3, dtype=torch.float64, generator=g)
    expected, slot = hidden.clone(), 0
    for norm, (num_chunks, gate_ids) in zip(cache.norms, cache.gate_slots):
        modulation = norm.linear(torch.nn.functional.silu(temb)).chunk(num_chunks, dim=1)
        for gate_id in gate_ids:
            expected = expected + modulation[gate_id].unsqueeze(1) * sum(w * f[slot] for w, f in zip(weights, features))
            slot += 1
    with torch.no_grad():
        got = forecast_image_stream(hidden, temb, weights, *cache._gate_rows(torch.float64), features)
    assert slot == slots == 8
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


def test_regionally_compiled_blocks_match_eager(make_args):
    flags = ("--cache_mode", "taylor", "--interval", "3")
    _, eager = generate(make_args, *flags, steps=6)
    args = validate_args(make_args("--disable_bf16", *flags))
    pipe = optimize(load_pipeline(args), args)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")  # dynamo tracing, fast on CPU
    for _ in range(2):  # second run: no recompiles needed, state reset
        _, compiled = generate(make_args, *flags, steps=6, pipe=pipe)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    cache = pipe.transformer.harness_cache
    assert cache.forecast_backend == "aot_eager" and set(cache._compiled) == {"forecast"}  # the cheap path
    assert cache.stats()["step_kinds"] == "FFFccF"


def test_a_cache_on_blocks_this_process_compiled_without_it_still_captures(make_args):
    """Dynamo does not guard compiled blocks on their submodules' forward hooks: blocks of one class compiled without
    the cache's capture hooks (another pipeline in the same process) were reused for a cached pipeline, which then
    captured nothing (KeyError at the first full step). Attaching the cache starts from no compiled code."""
    torch._dynamo.reset()
    plain, _ = generate(make_args, steps=2)
    plain.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    generate(make_args, steps=2, pipe=plain)
    args = validate_args(make_args("--disable_bf16", "--num_inference_steps", "6", "--cache_mode", "taylor",
                                   "--interval", "3"))
    pipe = optimize(load_pipeline(args), args)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    _, images = generate(make_args, "--cache_mode", "taylor", "--interval", "3", pipe=pipe)
    assert torch.isfinite(images).all() and pipe.transformer.harness_cache.stats()["step_kinds"] == "FFFccF"


def test_switching_to_a_mode_with_more_orders_gives_that_modes_image(make_args):
    """The feature buffers persist across generations: switching a pipeline from fora (one buffer) to taylor (three)
    adds two, and the image is the one a fresh taylor pipeline gives."""
    from utils.caching import attach_cache

    flags = ("--cache_mode", "taylor", "--interval", "3")
    _, fresh = generate(make_args, *flags)
    pipe, _ = generate(make_args, "--cache_mode", "fora", "--interval", "3")
    attach_cache(pipe, "taylor", interval=3)
    _, switched = generate(make_args, *flags, pipe=pipe)
    assert len(pipe.transformer.harness_cache.features) == 3
    torch.testing.assert_close(switched, fresh, rtol=0, atol=0)


def test_cache_dit_runs_through_its_public_api(make_args, tmp_path):
    pytest.importorskip("cache_dit", reason="cache-dit is in requirements.txt; without it --cache_mode cache_dit is refused (tested above)")
    config = tmp_path / "skip_all.yaml"  # cache-dit's own format; a huge threshold to see cached steps here
    config.write_text("cache_config:\n  max_warmup_steps: 2\n  max_continuous_cached_steps: -1\n"
                      "  Fn_compute_blocks: 1\n  Bn_compute_blocks: 0\n  residual_diff_threshold: 1.0e+9\n"
                      "  enable_taylorseer: true\n  taylorseer_order: 1\n")
    pipe, images = generate(make_args, "--cache_dit_config", str(config), steps=8)
    stats = pipe.transformer.harness_cache.stats()
    assert stats["mode"] == "cache_dit" and stats["forecast_steps"] > 0
    assert stats["full_steps"] + stats["forecast_steps"] == 8 and torch.isfinite(images).all()
    _, shipped = generate(make_args, "--cache_dit_config", "configs/cache_dit.yaml", steps=4)
    assert torch.isfinite(shipped).all()


# --- the forecast window ---------------------------------------------------------------------------

@pytest.mark.parametrize("ckpt", ["tiny", "tiny:flux-kontext"])
def test_flux_temb_is_every_steps_temb_bit_for_bit(make_args, ckpt):
    """The window computes temb ahead, from the schedule's timesteps and the call's other arguments: in bfloat16 (the
    dtype whose roundings the pipeline's `/ 1000` and the forward's `* 1000` make), at every step of a generation,
    equal to the temb the transformer computes."""
    flags = ["--ckpt", ckpt, "--num_inference_steps", "5"] + (["--image", str(KONTEXT_IMAGE)] if "kontext" in ckpt else [])
    args = validate_args(make_args(*flags))
    pipe = load_pipeline(args)
    transformer, seen = pipe.transformer, []
    hooks = [transformer.register_forward_pre_hook(lambda m, a, kw: seen.append([dict(kw)]), with_kwargs=True),
             transformer.time_text_embed.register_forward_hook(lambda m, a, out: seen[-1].append(out))]
    pipe(**pipeline_call_kwargs(args), generator=torch.manual_seed(0), output_type="latent")
    for hook in hooks:
        hook.remove()
    timesteps = pipe.scheduler.timesteps
    assert transformer.dtype == torch.bfloat16 and len(seen) == len(timesteps) == 5
    with torch.no_grad():
        for step, (kwargs, temb) in enumerate(seen):
            for j in range(len(timesteps)):  # from any step's arguments, any step's temb
                assert torch.equal(caching.flux_temb(transformer, timesteps[j], kwargs), seen[j][1]), (step, j)


@pytest.mark.parametrize("mode", ["fora", "taylor", "hicache"])
def test_the_window_forecast_is_the_per_step_forecast(make_args, mode):
    """One pass per window gives each forecast step what forecasting it alone gives (float32: the sums' order
    differs), with the same schedule; its FLOPs: the window's first step does the forecasting."""
    flags = ("--cache_mode", mode, "--interval", "4")
    window_pipe, window = generate(make_args, *flags, "--forecast_window", steps=13)
    _, per_step = generate(make_args, *flags, steps=13)
    torch.testing.assert_close(window, per_step, rtol=1e-5, atol=1e-5)
    stats = window_pipe.transformer.harness_cache.stats()
    assert stats["step_kinds"] == "FFFcccFcccFcc" and stats["forecast_windows"] == 3
    assert 0 < stats["flops_forecast_step"] < stats["flops_full_step"] / 10
    assert "forecasts one pass per window" in window_pipe.harness_stack["feature_cache"]


def test_the_window_forecast_is_flux_only_and_at_most_three_orders(make_args):
    assert not generate(make_args, "--ckpt", "tiny:qwen-image", "--cache_mode", "hicache", "--interval", "3",
                        "--forecast_window", steps=2)[0].transformer.harness_cache.uses_window()
    cache = generate(make_args, "--cache_mode", "taylor", "--interval", "3", "--max_order", "3", "--forecast_window",
                     steps=2)[0].transformer.harness_cache
    assert not cache.uses_window()

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from utils import metric_models, metrics
from utils.metric_models import INCEPTION_FILE, MissingMetricWeightsError, hub_checkpoints, write_random_inception_weights
from utils.metrics import METRIC_NAMES, PSNR_CAP_DB, compute_metrics, fid_from_features, load_metric_models

PROMPTS = ["a red fox in the snow", 'a sign that says "OPEN"', "three apples on a plate"]


@pytest.fixture(scope="module")
def random_models():
    return load_metric_models(METRIC_NAMES, weights_dir=None, random_init=True, device="cpu")


@pytest.fixture
def images():
    # Fresh random images from the global RNG. (Seeding a generator from torch.seed() made the global RNG
    # replay the same stream, so `torch.rand_like(images)` in a test sometimes equalled `images`.)
    return torch.rand(3, 3, 48, 64)


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook FID (Heusel et al.) with scipy's sqrtm: the oracle."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    sigma_x, sigma_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_x @ sigma_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(sigma_x) + np.trace(sigma_y) - 2 * np.trace(covmean))


@pytest.mark.parametrize("samples, dims", [(400, 16), (60, 24)])  # torch-fidelity path; low-rank path (n < d)
def test_fid_matches_scipy_reference_on_gaussian_features(samples, dims):
    rng = np.random.default_rng()
    mix_x, mix_y = rng.normal(size=(dims, dims)), rng.normal(size=(dims, dims))
    x = rng.normal(size=(samples, dims)) @ mix_x + rng.normal(size=dims)
    y = rng.normal(size=(samples + 7, dims)) @ mix_y + rng.normal(size=dims)
    expected = scipy_fid(x, y)
    got = fid_from_features(torch.from_numpy(x), torch.from_numpy(y))
    assert expected > 1.0
    assert got == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(0.0, abs=1e-8 * expected)


def test_psnr_matches_known_mse(images):
    base = 0.25 + 0.5 * images  # headroom so the shift is not clipped
    shift = torch.tensor([0.01, 0.05, 0.2]).view(3, 1, 1, 1)
    expected = -20.0 * torch.log10(shift.flatten())  # MSE = shift^2, peak 1
    torch.testing.assert_close(metrics.psnr_per_image(base + shift, base), expected, rtol=1e-4, atol=1e-4)
    noisy = (base + 0.03 * torch.randn_like(base)).clamp(0, 1)
    mse = (noisy - base).square().flatten(1).mean(1)
    torch.testing.assert_close(metrics.psnr_per_image(noisy, base), 10 * torch.log10(1 / mse), rtol=1e-4, atol=1e-4)


def test_ssim_of_self_is_one_and_constant_shift_matches_formula(images):
    torch.testing.assert_close(metrics.ssim_per_image(images, images), torch.ones(3), rtol=0, atol=1e-5)
    level = 0.1 + 0.6 * torch.rand(3).view(3, 1, 1, 1)
    shift = 0.05 + 0.2 * torch.rand(3).view(3, 1, 1, 1)
    level, shift = level.double(), shift.double()  # float64: float32 variance round-off is ~1e-4 of SSIM here
    flat = level.expand(3, 3, 32, 32).clone()
    # Zero variance and covariance: SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 * data_range)^2.
    a, b, c1 = level.flatten(), (level + shift).flatten(), 0.01**2
    expected = (2 * a * b + c1) / (a**2 + b**2 + c1)
    torch.testing.assert_close(metrics.ssim_per_image(flat + shift, flat), expected, rtol=1e-7, atol=1e-7)


def test_lpips_adapter_shape_and_range(random_models, images):
    other = torch.rand_like(images)
    values = metrics.lpips_per_image(random_models["lpips"], images, other)
    assert values.shape == (3,) and torch.isfinite(values).all() and (values > 0).all()
    assert type(random_models["lpips"]).__module__ == "lpips.lpips"


def test_clip_adapter_shape_and_range(random_models, images):
    values = metrics.clip_score_per_image(random_models["clip"], images, PROMPTS)
    assert values.shape == (3,) and torch.isfinite(values).all()
    assert ((values >= 0) & (values <= 100)).all()
    assert type(random_models["clip"]["model"]).__module__.startswith("open_clip")


def test_image_reward_adapter_shape_and_range(random_models, images):
    model = random_models["image_reward"]
    values = metrics.image_reward_per_image(model, images, PROMPTS)
    assert type(model).__qualname__ == "ImageReward" and type(model).__module__ == "ImageReward.ImageReward"
    assert values.shape == (3,) and torch.isfinite(values).all() and values.abs().max() < 50
    tokens = model.blip.tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    assert (tokens != model.blip.tokenizer.unk_token_id).all()  # the offline vocab covers English prompts


def test_inception_adapter_features(random_models, images):
    features = metrics.inception_features(random_models["fid"], images[:2], "cpu", batch_size=2)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert (features[0] - features[1]).abs().max() > 0


def test_image_set_against_itself_gives_ideal_values(random_models, images, tmp_path):
    for index, image in enumerate(metrics.to_uint8(images)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"real_{index}.png")
    random_models["fid_reference_dir"] = tmp_path
    try:
        per_image, set_level = compute_metrics(METRIC_NAMES, images, images.clone(), PROMPTS, random_models)
    finally:
        random_models.pop("fid_reference_dir"), random_models.pop("fid_reference_features", None)
    assert len(per_image) == 3 and set(per_image[0]) == {"psnr", "ssim", "lpips", "clip", "image_reward"}
    assert all(row["psnr"] == PSNR_CAP_DB for row in per_image)
    assert all(row["ssim"] == pytest.approx(1.0, abs=1e-5) for row in per_image)
    assert all(abs(row["lpips"]) < 1e-6 for row in per_image)
    assert set_level["fid"] == pytest.approx(0.0, abs=1e-6)
    assert set_level["fid_reference"] == pytest.approx(0.0, abs=1e-6)  # PNG round trip is exact in uint8
    assert set_level["clip_mean"] == pytest.approx(np.mean([row["clip"] for row in per_image]))


def test_baseline_without_refs_and_pil_input(random_models, images):
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in metrics.to_uint8(images)]
    names = ["psnr", "ssim", "lpips", "clip"]
    per_image, set_level = compute_metrics(names, pil_images, None, PROMPTS, random_models, batch_size=2)
    assert set(per_image[0]) == {"clip"} and set(set_level) == {"clip_mean", "clip_std"}
    from_tensor, _ = compute_metrics(["clip"], metrics.to_uint8(images).float() / 255, None, PROMPTS, random_models)
    assert [row["clip"] for row in per_image] == pytest.approx([row["clip"] for row in from_tensor], abs=1e-4)


def test_missing_weights_give_the_download_command(tmp_path):
    for name in ("fid", "lpips", "clip", "image_reward"):
        with pytest.raises(MissingMetricWeightsError, match=r"python run_ablation.py --download-metric-weights"):
            load_metric_models([name], weights_dir=str(tmp_path), random_init=False, device="cpu")
    with pytest.raises(MissingMetricWeightsError, match="--metrics_weights_dir"):
        load_metric_models(["lpips"], weights_dir=None, random_init=False, device="cpu")
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric_models(["fvd"], weights_dir=None, random_init=True, device="cpu")
    assert load_metric_models(["psnr", "ssim"], weights_dir=None, random_init=False, device="cpu")["names"] == ["psnr", "ssim"]


def test_inception_loads_from_weights_dir_layout(tmp_path):
    checkpoints = hub_checkpoints(tmp_path)
    checkpoints.mkdir(parents=True)
    write_random_inception_weights(checkpoints / INCEPTION_FILE)
    models = load_metric_models(["fid"], weights_dir=str(tmp_path), random_init=False, device="cpu")
    state = torch.load(checkpoints / INCEPTION_FILE)
    torch.testing.assert_close(models["fid"].state_dict()["fc.weight"], state["fc.weight"])
    assert not math.isnan(fid_from_features(torch.randn(5, 8), torch.randn(6, 8)))


def test_progress_counts_every_batch_and_fid_matches_whole_set_features(random_models):
    images, refs = torch.rand(5, 3, 32, 32), torch.rand(5, 3, 32, 32)
    done = []
    per_image, set_level = compute_metrics(["psnr", "fid"], images, refs, PROMPTS + PROMPTS[:2], random_models,
                                           batch_size=2, progress=done.append)
    assert done == [2, 2, 1] and len(per_image) == 5
    features = [metrics.inception_features(random_models["fid"], x, "cpu", batch_size=2) for x in (images, refs)]
    assert set_level["fid"] == fid_from_features(*features)  # the same batches, the same value, bit for bit


def test_random_init_metric_models_build_without_third_party_notices():
    import logging
    import warnings

    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    root = logging.getLogger()
    handler = Keep()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_metric_models(["lpips", "clip"], weights_dir=None, random_init=True, device="cpu")
    finally:
        root.removeHandler(handler)
    assert not [str(w.message) for w in caught if "torchvision" in w.filename], [str(w.message) for w in caught]
    assert not any("No pretrained weights loaded" in m for m in messages), messages
    assert not any(isinstance(f, metric_models._DropMessage) for f in root.filters)  # removed after the build


def test_clip_model_is_selectable_and_named_where_its_weights_are_missing(tmp_path):
    """The CLIP score's model: ViT-L-14 (OpenAI) by default, ViT-g-14 (LAION-2B) selectable; each looks for its own
    file, and an unknown name is refused."""
    import pytest

    for arch, file in (("ViT-L-14", "ViT-L-14-openai"), ("ViT-g-14", "ViT-g-14-laion2b_s34b_b88k")):
        with pytest.raises(metric_models.MissingMetricWeightsError, match=file):
            load_metric_models(["clip"], weights_dir=str(tmp_path), random_init=False, device="cpu", clip_model=arch)
    with pytest.raises(ValueError, match="clip_model must be one of ViT-L-14, ViT-g-14"):
        metric_models.build_clip_model(tmp_path, False, "cpu", clip_model="ViT-B-32")


def test_sweep_config_names_its_clip_model_in_the_table(tmp_path):
    import pandas as pd
    import pytest
    import yaml

    import run_ablation
    from utils import sweep

    raw = {"output_dir": str(tmp_path / "out"), "baseline": "none", "variants": [{"name": "none"}],
           "base": {"ckpt": "tiny", "disable_bf16": True, "num_inference_steps": 2},
           "prompts": {"spec": "default", "limit": 1}, "warmup_runs": 0, "metrics": ["clip"],
           "metrics_random_init": True, "clip_model": "ViT-g-14"}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert run_ablation.main(["--config", str(config)]) == 0
    table = pd.read_csv(tmp_path / "out/summary.csv")
    assert list(table["clip_model"]) == ["ViT-g-14"]
    assert "CLIP score ViT-g-14 (random-init)" in (tmp_path / "out/summary.md").read_text()
    config.write_text(yaml.safe_dump({**raw, "clip_model": "ViT-H-14"}))
    with pytest.raises(sweep.ConfigError, match="clip_model must be one of ViT-L-14, ViT-g-14"):
        sweep.load_config(config, check_machine=False)

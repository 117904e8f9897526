"""Quality metrics of a variant's images: vs the baseline image (PSNR, SSIM, LPIPS), vs the baseline set (FID),
vs the prompt (CLIP score, ImageReward). Batched on the models' device; images are N x 3 x H x W floats in [0, 1].

Per-image values come back one dict per image; set-level values (FID, mean and std of each per-image metric)
in one dict. With refs=None (the baseline variant itself) the reference metrics are skipped.
PSNR of identical images is capped at PSNR_CAP_DB instead of inf, so that means and JSON stay finite.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.metric_models import BUILDERS, MissingMetricWeightsError, download_metric_weights  # noqa: F401

# torchmetrics is imported where PSNR and SSIM are computed: importing this module stays cheap for a config check.
METRIC_NAMES = ("psnr", "ssim", "lpips", "fid", "clip", "image_reward")
REFERENCE_METRICS = ("psnr", "ssim", "lpips")  # per image, vs the baseline image of the same prompt and seed
PROMPT_METRICS = ("clip", "image_reward")  # per image, vs its prompt
PSNR_CAP_DB = 100.0  # PSNR of identical images (MSE 0) is reported as this, not inf
IMAGE_REWARD_MAX_TOKENS = 35  # as ImageReward.score()
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # ImageReward's


def check_metric_names(names) -> list[str]:
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    return list(names)


def load_metric_models(
    names, weights_dir: str | None, random_init: bool, device: str, fid_reference_dir: str | None = None,
    clip_model: str = "ViT-L-14",
) -> dict:
    """Build the backbones the named metrics need. Weights come from weights_dir (layout: utils/metric_models.py)
    unless random_init. fid_reference_dir: optional folder of real images (e.g. COCO val) for a second FID.
    clip_model: the CLIP score's model (utils.metric_models.CLIP_MODELS)."""
    names = check_metric_names(names)
    if not random_init and weights_dir is None and any(name in BUILDERS for name in names):
        raise MissingMetricWeightsError(
            "metrics need --metrics_weights_dir DIR (fill it with `python run_ablation.py --download-metric-weights "
            "DIR` on a machine with internet access), or random-init metric models for a smoke run"
        )
    weights_dir = Path(weights_dir) if weights_dir is not None else None
    models = {"device": device, "names": names}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-init models: the same weights every run, whatever ran before
        for name in names:
            if name == "clip":
                models[name] = BUILDERS[name](weights_dir, random_init, device, clip_model=clip_model)
            elif name in BUILDERS:
                models[name] = BUILDERS[name](weights_dir, random_init, device)
    if fid_reference_dir is not None:
        if "fid" not in models:
            raise ValueError("fid_reference_dir needs the 'fid' metric")
        models["fid_reference_dir"] = Path(fid_reference_dir)
    return models


# ---- image handling --------------------------------------------------------------------------------------


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """H x W x C PIL image -> C x H x W uint8 tensor (as torchvision's pil_to_tensor)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_image_tensor(images) -> torch.Tensor:
    """A list of PIL images (same size) -> N x 3 x H x W uint8 tensor; a float tensor in [0, 1] stays float.

    PIL images stay uint8 on the CPU (a quarter of float32's memory and no CPU-side conversion); each batch
    becomes float on the metric device (to_float_batch)."""
    if isinstance(images, torch.Tensor):
        tensor = images.detach().cpu()
        tensor = tensor if tensor.dtype == torch.uint8 else tensor.float().clamp(0.0, 1.0)
    else:
        tensor = torch.stack([pil_to_tensor(image.convert("RGB")) for image in images])
    if tensor.dim() != 4 or tensor.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W images, got shape {tuple(tensor.shape)}")
    return tensor


def load_image_files(paths: list[Path], workers: int = 8) -> torch.Tensor:
    """Decode image files (same size) into one N x 3 x H x W uint8 tensor, on a thread pool: PIL releases the
    GIL while it inflates a PNG, and a sweep's 1024^2 PNGs take ~20 ms each to decode."""
    def load(path):
        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        return torch.stack(list(pool.map(load, paths)))


def to_float_batch(images: torch.Tensor, device: str) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float32 in [0, 1] on `device`."""
    images = images.to(device, non_blocking=True)
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of the shorter side to `size`, then a center crop, as CLIP/BLIP preprocessing does."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top : top + size, left : left + size].clamp(0.0, 1.0)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def batches(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


# ---- per-image metrics -----------------------------------------------------------------------------------


def psnr_per_image(images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    values = peak_signal_noise_ratio(images, refs, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.clamp(max=PSNR_CAP_DB)


def ssim_per_image(images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(images, refs, data_range=1.0, reduction="none")


@torch.no_grad()
def lpips_per_image(model, images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    return model(images, refs, normalize=True).flatten()  # normalize: [0, 1] -> [-1, 1]


@torch.no_grad()
def clip_score_per_image(clip: dict, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """torchmetrics' CLIP score definition, on open_clip: 100 * max(cos(image, text), 0)."""
    model, preprocess = clip["model"], clip["preprocess"]
    size = preprocess["size"][0] if isinstance(preprocess["size"], (tuple, list)) else preprocess["size"]
    pixels = normalize(resize_center_crop(images, size), preprocess["mean"], preprocess["std"])
    tokens = clip["tokenizer"](prompts).to(images.device)
    image_features = F.normalize(model.encode_image(pixels).float(), dim=-1)
    text_features = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return 100.0 * (image_features * text_features).sum(dim=-1).clamp(min=0.0)


@torch.no_grad()
def image_reward_per_image(model, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """ImageReward's batched scorer (score_gard) with its 224 px CLIP-normalised preprocessing done on tensors."""
    pixels = normalize(resize_center_crop(images, 224), *CLIP_MEAN_STD)
    text = model.blip.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=IMAGE_REWARD_MAX_TOKENS, return_tensors="pt"
    ).to(images.device)
    return model.score_gard(text.input_ids, text.attention_mask, pixels).flatten().float()


# ---- FID -------------------------------------------------------------------------------------------------


@torch.no_grad()
def inception_features(model, images: torch.Tensor, device: str, batch_size: int) -> torch.Tensor:
    features = [model(to_uint8(images[part].to(device)))[0].cpu() for part in batches(len(images), batch_size)]
    return torch.cat(features).double()


def fid_from_features(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance of two feature sets.

    With at least as many samples as feature dims, torch-fidelity's own statistics and distance. With fewer
    (the usual ablation: tens to hundreds of images vs 2048 Inception dims), the same value from the
    low-rank identity tr sqrt(S1 S2) = nuclear norm of A1^T A2, where S = A A^T and A = centered X^T / sqrt(n-1):
    exact, and it avoids a 2048 x 2048 eigendecomposition (tens of seconds on a small CPU) per variant.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    if len(features_a) < 2 or len(features_b) < 2:
        return math.nan  # a covariance needs two samples
    features_a, features_b = features_a.double(), features_b.double()
    if min(len(features_a), len(features_b)) >= features_a.shape[1]:
        stats_a, stats_b = fid_features_to_statistics(features_a.cpu()), fid_features_to_statistics(features_b.cpu())
        return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    a = (features_a - mean_a).T / math.sqrt(len(features_a) - 1)
    b = (features_b - mean_b).T / math.sqrt(len(features_b) - 1)
    trace_sqrt = torch.linalg.svdvals(a.T @ b).sum()
    fid = (mean_a - mean_b).square().sum() + a.square().sum() + b.square().sum() - 2.0 * trace_sqrt
    return float(fid)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@torch.no_grad()
def reference_folder_features(model, folder: Path, device: str, batch_size: int) -> torch.Tensor:
    """Inception features of real images of any sizes (Inception resizes to 299 itself): batch same-size images."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under FID reference folder {folder}")
    by_size: dict[tuple[int, int], list[torch.Tensor]] = {}
    features = []
    for path in paths:
        with Image.open(path) as image:
            tensor = pil_to_tensor(image.convert("RGB"))
        group = by_size.setdefault(tuple(tensor.shape[-2:]), [])
        group.append(tensor)
        if len(group) == batch_size:
            features.append(model(torch.stack(group).to(device))[0].cpu())
            group.clear()
    features += [model(torch.stack(group).to(device))[0].cpu() for group in by_size.values() if group]
    return torch.cat(features).double()


# ---- the API the runner calls ------------------------------------------------------------------------------


def compute_metrics(names, images, refs, prompts, models, batch_size: int = 16,
                    progress: Callable[[int], object] | None = None) -> tuple[list[dict], dict]:
    """Per-image metric dicts (one per image, in order) and set-level values (fid, fid_reference, <name>_mean/_std).

    images/refs: lists of PIL images, or N x 3 x H x W tensors (uint8, or float in [0, 1]); refs[i] is the baseline image of the
    same prompt and seed as images[i], or refs is None for the baseline itself. prompts: one per image.
    progress(n) is called after each batch of n images (every metric of it done).
    """
    names = check_metric_names(names)
    device = models["device"]
    images = to_image_tensor(images)
    refs = to_image_tensor(refs) if refs is not None else None
    if refs is not None and refs.shape != images.shape:
        raise ValueError(f"images {tuple(images.shape)} and baseline refs {tuple(refs.shape)} differ in shape")
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")

    per_image_names = [n for n in names if n in PROMPT_METRICS or (n in REFERENCE_METRICS and refs is not None)]
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in per_image_names}
    features: dict[str, list[torch.Tensor]] = {"images": [], "refs": []}  # Inception features, for FID
    for part in batches(len(images), batch_size):
        batch = to_float_batch(images[part], device)
        ref_batch = to_float_batch(refs[part], device) if refs is not None else None
        prompt_batch = list(prompts[part]) if prompts is not None else None
        for name in per_image_names:
            if name == "psnr":
                values = psnr_per_image(batch, ref_batch)
            elif name == "ssim":
                values = ssim_per_image(batch, ref_batch)
            elif name == "lpips":
                values = lpips_per_image(models["lpips"], batch, ref_batch)
            elif name == "clip":
                values = clip_score_per_image(models["clip"], batch, prompt_batch)
            else:
                values = image_reward_per_image(models["image_reward"], batch, prompt_batch)
            columns[name].append(values.float().cpu())
        if "fid" in names:
            with torch.no_grad():
                features["images"].append(models["fid"](to_uint8(images[part].to(device)))[0].cpu())
                if refs is not None:
                    features["refs"].append(models["fid"](to_uint8(refs[part].to(device)))[0].cpu())
        if progress is not None:
            progress(part.stop - part.start)

    values = {name: torch.cat(parts).tolist() for name, parts in columns.items()}
    per_image = [{name: values[name][i] for name in per_image_names} for i in range(len(images))]
    set_level: dict[str, float] = {}
    for name in per_image_names:
        column = np.asarray(values[name], dtype=np.float64)
        set_level[f"{name}_mean"] = float(column.mean())
        set_level[f"{name}_std"] = float(column.std(ddof=1)) if len(column) > 1 else 0.0

    if "fid" in names:
        image_features = torch.cat(features["images"]).double()
        if refs is not None:
            set_level["fid"] = fid_from_features(image_features, torch.cat(features["refs"]).double())
        if models.get("fid_reference_dir") is not None:
            if "fid_reference_features" not in models:  # real images: extract once per run, reuse for every variant
                models["fid_reference_features"] = reference_folder_features(
                    models["fid"], models["fid_reference_dir"], device, batch_size
                )
            set_level["fid_reference"] = fid_from_features(image_features, models["fid_reference_features"])
    return per_image, set_level

"""Backbones for the quality metrics: where their weights live, how they load offline, how to fetch them.

Weights dir layout (`--metrics_weights_dir DIR`, filled by `python run_ablation.py --download-metric-weights DIR`):

    DIR/torch_hub/checkpoints/weights-inception-2015-12-05-6726825d.pth  # FID: torch-fidelity's InceptionV3
    DIR/torch_hub/checkpoints/alexnet-owt-7be5be79.pth                   # LPIPS: torchvision AlexNet (the LPIPS
                                                                         #   linear heads ship inside `lpips`)
    DIR/open_clip/ViT-L-14-openai.safetensors                            # CLIP score (.bin if no safetensors)
    DIR/open_clip/ViT-g-14-laion2b_s34b_b88k.safetensors                 # CLIP score with clip_model: ViT-g-14
    DIR/image_reward/ImageReward.pt                                      # ImageReward-v1.0 (THUDM/ImageReward)
    DIR/image_reward/med_config.json                                     # its BLIP BERT config
    DIR/image_reward/bert-base-uncased/                                  # its tokenizer (save_pretrained folder)

random_init=True builds the same model classes with random weights and no files (tests, the smoke config):
the numbers are meaningless, the plumbing is real. CLIP then uses a smaller open_clip architecture and
ImageReward a 2-block ViT and 1-layer BERT, so that the smoke run stays fast on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import torch

from utils import image_reward_compat

DOWNLOAD_HINT = "python run_ablation.py --download-metric-weights {dir}"
CLIP_ARCH = "ViT-L-14"  # the CLIP score of most text-to-image papers
# The CLIP score's models (open_clip architecture -> pretrained tag): ViT-L/14 with OpenAI's weights by default;
# ViT-g/14 trained on LAION-2B, the one cache-dit's DrawBench tables report.
CLIP_MODELS = {"ViT-L-14": "openai", "ViT-g-14": "laion2b_s34b_b88k"}
CLIP_RANDOM_ARCH = "ViT-M-32-alt"  # small open_clip architecture for random-init runs
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # basename of torch-fidelity's URL
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # basename of torchvision's AlexNet IMAGENET1K_V1 URL
IMAGE_REWARD_REPO = "THUDM/ImageReward"
TOKENIZER_REPO = "google-bert/bert-base-uncased"


class MissingMetricWeightsError(FileNotFoundError):
    pass


def _require(path: Path, metric: str, weights_dir: Path) -> Path:
    if not path.exists():
        raise MissingMetricWeightsError(
            f"{metric}: missing weights {path}. Fetch all metric weights on a machine with internet access with "
            f"`{DOWNLOAD_HINT.format(dir=weights_dir)}` and copy the folder here."
        )
    return path


def hub_checkpoints(weights_dir: str | Path) -> Path:
    return Path(weights_dir) / "torch_hub" / "checkpoints"


@contextlib.contextmanager
def torch_hub_dir(path: Path):
    """Point torch.hub (used by torchvision and lpips for AlexNet) at `path` for the duration."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


# ---- FID: torch-fidelity's InceptionV3 --------------------------------------------------------------------


def write_random_inception_weights(path: str | Path) -> Path:
    """Save a random-init state dict of torch-fidelity's InceptionV3 (its constructor insists on a weights file)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class RandomInception(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init
            return None

    with mock.patch.object(fe, "load_state_dict_from_url", return_value=None):
        model = RandomInception("inception-v3-compat", ["2048"])
    for module in model.modules():  # He init keeps activations alive through ~50 ReLU convs (default init fades)
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return Path(path)


def load_inception(weights_path: str | Path, device: str) -> torch.nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path))
    return model.to(device).eval()


def build_fid_model(weights_dir: Path | None, random_init: bool, device: str) -> torch.nn.Module:
    if random_init:
        with tempfile.TemporaryDirectory() as tmp:
            return load_inception(write_random_inception_weights(Path(tmp) / INCEPTION_FILE), device)
    return load_inception(_require(hub_checkpoints(weights_dir) / INCEPTION_FILE, "fid", weights_dir), device)


# ---- LPIPS: the lpips package (AlexNet + its shipped linear heads) -------------------------------------------


@contextlib.contextmanager
def lpips_torchvision_calls():
    """lpips 0.1.4 builds AlexNet with torchvision's `pretrained=` argument, for which torchvision warns on every
    build that it is deprecated; the two warnings are left out here, and torchvision's others kept."""
    with warnings.catch_warnings():
        for message in (r"The parameter 'pretrained' is deprecated", r"Arguments other than a weight enum or `None`"):
            warnings.filterwarnings("ignore", message=message, category=UserWarning, module=r"torchvision\.")
        yield


def build_lpips_model(weights_dir: Path | None, random_init: bool, device: str) -> torch.nn.Module:
    import lpips

    if random_init:
        with lpips_torchvision_calls():
            model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    else:
        checkpoints = hub_checkpoints(weights_dir)
        _require(checkpoints / ALEXNET_FILE, "lpips", weights_dir)
        # torchvision finds the AlexNet file in its hub cache, no download
        with torch_hub_dir(checkpoints.parent), lpips_torchvision_calls():
            model = lpips.LPIPS(net="alex", pnet_rand=False, verbose=False)
    return model.to(device).eval()


# ---- CLIP score: open_clip ----------------------------------------------------------------------------------


def clip_weights_path(weights_dir: Path, arch: str = CLIP_ARCH) -> Path | None:
    matches = sorted((Path(weights_dir) / "open_clip").glob(f"{arch}-{CLIP_MODELS[arch]}.*"))
    return matches[0] if matches else None


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def build_clip_model(weights_dir: Path | None, random_init: bool, device: str, clip_model: str = CLIP_ARCH) -> dict:
    """open_clip's `clip_model` (a CLIP_MODELS key) with its weights from weights_dir; random_init: a small
    architecture with random weights instead (the record says which model the score comes from)."""
    import open_clip

    if clip_model not in CLIP_MODELS:
        raise ValueError(f"clip_model must be one of {', '.join(CLIP_MODELS)} (got {clip_model!r})")
    if random_init:
        arch, pretrained, quick_gelu = CLIP_RANDOM_ARCH, None, False
    else:
        tag = CLIP_MODELS[clip_model]
        default = Path(weights_dir) / "open_clip" / f"{clip_model}-{tag}.safetensors"
        pretrained = str(_require(clip_weights_path(weights_dir, clip_model) or default, "clip", weights_dir))
        arch = clip_model
        # OpenAI's checkpoints were trained with QuickGELU; the tag would set it, a file path does not.
        quick_gelu = open_clip.get_pretrained_cfg(clip_model, tag).get("quick_gelu", False)
    with contextlib.ExitStack() as stack:
        if random_init:  # asked for: open_clip's notice that no weights were loaded says what the caller chose
            root, drop = logging.getLogger(), _DropMessage(f"No pretrained weights loaded for model '{arch}'")
            root.addFilter(drop)
            stack.callback(root.removeFilter, drop)
        model = open_clip.create_model(
            arch, pretrained=pretrained, force_quick_gelu=quick_gelu, device=device, require_pretrained=not random_init
        )
    return {"model": model.eval(), "tokenizer": open_clip.get_tokenizer(arch), "preprocess": model.visual.preprocess_cfg}


# ---- ImageReward -------------------------------------------------------------------------------------------


def write_tiny_bert_vocab(folder: Path) -> Path:
    """A character-level WordPiece vocab (any English prompt tokenizes, no Hub download) for random-init runs."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + [f"##{c}" for c in letters] + list(".,!?'\"-")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return folder


def build_image_reward_model(weights_dir: Path | None, random_init: bool, device: str) -> torch.nn.Module:
    if random_init:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer_dir = write_tiny_bert_vocab(Path(tmp) / "tokenizer")
            vocab_size = len((tokenizer_dir / "vocab.txt").read_text().split()) + 2  # + [DEC], [ENC]
            med_config = image_reward_compat.write_med_config(
                Path(tmp) / "med_config.json", num_hidden_layers=1, vocab_size=vocab_size
            )
            tiny_vit = {"depth": 2, "embed_dim": 192, "num_heads": 3}
            return image_reward_compat.build_image_reward(med_config, tokenizer_dir, device, vit_overrides=tiny_vit)
    folder = Path(weights_dir) / "image_reward"
    checkpoint = _require(folder / "ImageReward.pt", "image_reward", weights_dir)
    med_config = _require(folder / "med_config.json", "image_reward", weights_dir)
    tokenizer_dir = _require(folder / "bert-base-uncased", "image_reward", weights_dir)
    model = image_reward_compat.build_image_reward(med_config, tokenizer_dir, "cpu")
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=False)
    result = model.load_state_dict(state_dict, strict=False)  # as ImageReward.load() does
    missing_parameters = set(result.missing_keys) & {name for name, _ in model.named_parameters()}
    if missing_parameters:
        raise RuntimeError(f"image_reward: {checkpoint} lacks parameters {sorted(missing_parameters)[:5]}...")
    model.device = device  # score_gard builds its attention masks on model.device
    return model.to(device).eval()


BUILDERS = {
    "fid": build_fid_model,
    "lpips": build_lpips_model,
    "clip": build_clip_model,
    "image_reward": build_image_reward_model,
}


# ---- Download (needs internet; not run in the offline tests) ---------------------------------------------------


def download_metric_weights(weights_dir: str | Path, clip_models: tuple[str, ...] = (CLIP_ARCH,)) -> None:
    """Fetch every metric's weights into the layout above, with each library's own URLs and download helpers
    (the CLIP score's: `clip_models`, ViT-L-14 by default)."""
    weights_dir = Path(weights_dir)
    checkpoints = hub_checkpoints(weights_dir)
    checkpoints.mkdir(parents=True, exist_ok=True)

    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torchvision.models import AlexNet_Weights

    for url in (URL_INCEPTION_V3, AlexNet_Weights.IMAGENET1K_V1.url):
        target = checkpoints / Path(url).name
        if not target.exists():
            torch.hub.download_url_to_file(url, str(target), progress=True)

    import open_clip

    clip_dir = weights_dir / "open_clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    for arch in clip_models:
        if clip_weights_path(weights_dir, arch) is None:
            tag = CLIP_MODELS[arch]
            with tempfile.TemporaryDirectory() as cache:
                fetched = Path(open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, tag), cache_dir=cache))
                shutil.copyfile(fetched, clip_dir / f"{arch}-{tag}{fetched.suffix}")

    from huggingface_hub import hf_hub_download
    from transformers import BertTokenizer

    reward_dir = weights_dir / "image_reward"
    for filename in ("ImageReward.pt", "med_config.json"):
        hf_hub_download(repo_id=IMAGE_REWARD_REPO, filename=filename, local_dir=reward_dir)
    BertTokenizer.from_pretrained(TOKENIZER_REPO).save_pretrained(reward_dir / "bert-base-uncased")

"""Import ImageReward 1.5's model class on the modern stack (timm>=1.0, transformers>=5, no clip, no fairscale).

image-reward 1.5 pins timm==0.6.13 (open_clip needs timm>=1.0.17), and its package __init__ pulls in
`clip` (OpenAI's, not on PyPI), its ReFL trainer (accelerate, datasets, diffusers) and fairscale. Scoring
needs none of these. So it is installed with `pip install --no-deps image-reward==1.5`, and this module
imports only `ImageReward.ImageReward` (the reward model: BLIP ViT-L + BERT + MLP), patching three things at
load time:
  - the package __init__ files of `ImageReward` and `ImageReward.models` are skipped (stub packages);
  - fairscale's `checkpoint_wrapper` (only used for training-time gradient checkpointing) gets a stub
    when fairscale is absent;
  - transformers>=5 dropped `apply_chunking_to_forward` & co from `transformers.modeling_utils`; they are
    re-exported there from `transformers.pytorch_utils` (or a shim for the prune helper, never used for scoring),
    and BLIP's BERT gets routed through post_init(), which transformers>=5 models must call.
The BERT tokenizer is loaded from a local folder instead of `bert-base-uncased` on the Hub.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path

# BLIP's med_config.json as shipped on the Hub (THUDM/ImageReward): BERT-base with cross-attention.
BLIP_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}


def _stub_package(name: str, path: Path) -> None:
    """Register `name` as a package whose submodules import from `path`, without running its __init__."""
    if name in sys.modules:
        return
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__spec__.submodule_search_locations = [str(path)]
    sys.modules[name] = module


def _stub_fairscale() -> None:
    if importlib.util.find_spec("fairscale") is not None:
        return

    def checkpoint_wrapper(module, *args, **kwargs):
        raise NotImplementedError("fairscale is not installed; ImageReward gradient checkpointing is training-only")

    names = ["fairscale", "fairscale.nn", "fairscale.nn.checkpoint", "fairscale.nn.checkpoint.checkpoint_activations"]
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[names[-1]].checkpoint_wrapper = checkpoint_wrapper


def _patch_transformers() -> None:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices"):
        if not hasattr(modeling_utils, name):
            fallback = getattr(pytorch_utils, name, None)
            if fallback is None:  # only reached by BertModel.prune_heads, which scoring never calls

                def fallback(*args, **kwargs):
                    raise NotImplementedError("head pruning is not supported in this ImageReward shim")

            setattr(modeling_utils, name, fallback)


def _patch_med_bert(med: types.ModuleType) -> None:
    """transformers>=5 models must call post_init() (it sets all_tied_weights_keys); BLIP's BERT calls init_weights()."""
    base_init_weights = med.PreTrainedModel.init_weights

    def init_weights(self):
        if not hasattr(self, "all_tied_weights_keys"):
            return self.post_init()  # which calls back here with the attribute set
        return base_init_weights(self)

    med.BertPreTrainedModel.init_weights = init_weights
    # transformers>=5 removed these ModuleUtilsMixin helpers; same math as transformers 4.x.
    if not hasattr(med.BertPreTrainedModel, "invert_attention_mask"):
        med.BertPreTrainedModel.invert_attention_mask = _invert_attention_mask
    if not hasattr(med.BertPreTrainedModel, "get_head_mask"):
        med.BertPreTrainedModel.get_head_mask = _get_head_mask


def _invert_attention_mask(self, encoder_attention_mask):
    import torch

    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    if head_mask is not None:
        raise NotImplementedError("head masks are not supported in this ImageReward shim")
    return [None] * num_hidden_layers


def import_image_reward_module() -> types.ModuleType:
    """Return the `ImageReward.ImageReward` module (class ImageReward), importing it without the package extras."""
    if "ImageReward.ImageReward" in sys.modules:
        return sys.modules["ImageReward.ImageReward"]
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "image-reward is not installed: pip install --no-deps image-reward==1.5 (see requirements.txt)"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    _stub_package("ImageReward", root)
    _stub_package("ImageReward.models", root / "models")
    _stub_fairscale()
    _patch_transformers()
    saved_filters = warnings.filters[:]  # BLIP's blip.py calls warnings.filterwarnings("ignore") at import
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths
            module = importlib.import_module("ImageReward.ImageReward")
    finally:
        warnings.filters[:] = saved_filters
    _patch_med_bert(sys.modules["ImageReward.models.BLIP.med"])
    return module


def init_tokenizer_from(tokenizer_dir: str | Path):
    """BLIP's init_tokenizer, reading bert-base-uncased from a local folder instead of the Hub."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # ids 30522 and 30523 on bert-base-uncased, as in BLIP
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)  # transformers>=5 has no additional_special_tokens_ids
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


@contextlib.contextmanager
def _patched(module: types.ModuleType, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def build_image_reward(
    med_config: str | Path, tokenizer_dir: str | Path, device: str = "cpu", vit_overrides: dict | None = None
):
    """Build ImageReward's own model class (random weights) with a local tokenizer.

    vit_overrides (e.g. {"depth": 2, "embed_dim": 192, "num_heads": 3}) shrinks the BLIP ViT for offline tests;
    None builds the real ViT-L/16 that the ImageReward-v1.0 checkpoint expects.
    """
    ir_module = import_image_reward_module()
    blip_pretrain = sys.modules["ImageReward.models.BLIP.blip_pretrain"]
    tokenizer_factory = lambda: init_tokenizer_from(tokenizer_dir)  # noqa: E731
    create_vit = blip_pretrain.create_vit
    if vit_overrides:
        vit_module = sys.modules["ImageReward.models.BLIP.vit"]

        def create_vit(vit, image_size, *args, **kwargs):
            encoder = vit_module.VisionTransformer(img_size=image_size, patch_size=16, **vit_overrides)
            return encoder, vit_overrides["embed_dim"]

    with _patched(blip_pretrain, "init_tokenizer", tokenizer_factory), _patched(blip_pretrain, "create_vit", create_vit):
        model = ir_module.ImageReward(med_config=str(med_config), device=device)
    return model.to(device).eval()


def write_med_config(path: str | Path, **overrides) -> Path:
    """Write BLIP's med_config.json (optionally shrunk for tests) and return its path."""
    path = Path(path)
    path.write_text(json.dumps({**BLIP_MED_CONFIG, **overrides}, indent=2))
    return path

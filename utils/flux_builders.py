"""Build FLUX and Qwen-Image pipelines without downloading anything.

* `build_tiny_pipeline()`: a miniature FLUX.1 with seeded random weights, made through the real
  diffusers/transformers classes, for CPU tests and smoke sweeps; `kontext=True` wraps the same
  components in FLUX.1-Kontext's pipeline (`--ckpt tiny:flux-kontext`).
* `build_tiny_qwen_pipeline()`: the same for Qwen-Image (`--ckpt tiny:qwen-image`).
* `build_random_pipeline("flux-dev" | "flux-schnell" | "flux-kontext" | "qwen-image")`: the full-size
  architectures with random weights, for timing on a GPU without the real checkpoint (identical
  compute, meaningless images).

All use the offline tokenizers below: real CLIP (byte-level BPE), T5 (Unigram) and Qwen2 (byte-level
BPE) tokenizer classes whose vocabularies are generated here instead of downloaded. Token ids differ from the real
checkpoints' but sequence lengths (77 CLIP, 512/256 T5) are the real ones. Their vocabularies know few
words, so most prompts take a token per letter and are cut at those lengths: a property of these
pipelines, stated once when the tiny one is built; the per-prompt truncation warnings of diffusers and
transformers are left out for them (DropOfflineTruncationWarnings).
"""

from __future__ import annotations

import logging
import string
import sys
import weakref

import torch
from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline,
                       FluxPipeline, FluxTransformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, T5Config, T5EncoderModel, T5Tokenizer)

CLIP_MAX_LENGTH = 77

# FLUX.1-dev/schnell/Kontext-dev and Qwen-Image `scheduler/scheduler_config.json`.
SCHEDULER_CONFIGS = {
    "flux-dev": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                     num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
    "flux-schnell": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                         num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
    "qwen-image": dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                       max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                       stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                       use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False),
}
SCHEDULER_CONFIGS["flux-kontext"] = SCHEDULER_CONFIGS["flux-dev"]
RANDOM_VARIANTS = ("flux-dev", "flux-schnell", "flux-kontext", "qwen-image")

# FLUX.1 `transformer/config.json` (dev has the guidance embedding, schnell does not).
FULL_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        axes_dims_rope=(16, 56, 56))
FULL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                force_upcast=True, mid_block_add_attention=True)
# openai/clip-vit-large-patch14 text tower and google/t5-v1_1-xxl encoder.
FULL_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
                 projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1)
FULL_T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
               is_encoder_decoder=False, use_cache=False)

# The miniature: 2 double + 4 single blocks, 2 heads of dim 16, a 2x-downsampling VAE with 4 latent
# channels (so a 64x64 image is a 16x16 grid of 256 image tokens), 4-layer text encoders of width 32.
TINY_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        axes_dims_rope=(4, 6, 6), guidance_embeds=True)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", projection_dim=32,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
TINY_T5 = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
               is_encoder_decoder=False, use_cache=False)
TINY_MAX_SEQUENCE_LENGTH = 32

# Qwen-Image `transformer/config.json` (MMDiT, 60 double-stream blocks, 20 B parameters) and its VAE (the class
# defaults are Qwen-Image's `vae/config.json`); the text encoder is Qwen2.5-VL-7B-Instruct.
FULL_QWEN_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                             axes_dims_rope=(16, 56, 56))
FULL_QWEN_VAE: dict = {}
FULL_QWEN_TEXT = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, vocab_size=152064,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    vocab_size=152064, tie_word_embeddings=False)
# The miniature Qwen-Image: 2 blocks, 2 heads of dim 16, a VAE of scale 4 with 4 latent channels (a 64x64 image is a
# 16x16 latent, 2x2 patches: 64 image tokens), a 2-layer Qwen2.5-VL text encoder of width 32.
TINY_QWEN_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False,
                             axes_dims_rope=(8, 4, 4))
TINY_QWEN_VAE = dict(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
TINY_QWEN_TEXT = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                             "mrope_section": [2, 3, 3]}),
    vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
    tie_word_embeddings=False)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def offline_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with a generated vocabulary: every byte, alone and word-final (no merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _bytes_to_unicode():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH,
                              bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    OFFLINE_TOKENIZERS.add(tokenizer)
    return tokenizer


def offline_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """T5's Unigram tokenizer with a generated vocabulary: characters, word starts and frequent words."""
    words = ("a an the of and in on with at by for to from photo painting portrait cat dog city night sky red blue "
             "green man woman street light sign reads text style oil watercolor astronaut lemon").split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -5.0) for w in words]
    pieces += [("▁" + c, -8.0) for c in string.ascii_lowercase + string.digits]
    pieces += [(c, -10.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = T5Tokenizer(vocab=pieces, model_max_length=model_max_length, extra_ids=100)
    OFFLINE_TOKENIZERS.add(tokenizer)
    return tokenizer


# Qwen-Image's prompt template (QwenImagePipeline.prompt_template_encode): the pipeline drops its first 34 tokens,
# the system prompt as Qwen2's real tokenizer splits it. The offline tokenizer below knows those pieces as words, so
# that the same 34 tokens are dropped here and the text sequence is the prompt plus the template's 5-token tail.
QWEN_TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color",
                       " shape", " size", " texture", " quantity", " text", " spatial", " relationships", " of",
                       " objects", " and", " background")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN_PROMPT_WORDS = tuple(" " + w for w in "a an photo painting portrait cat dog city night sky red blue green man woman "
                          "street light sign reads style oil watercolor astronaut lemon".split())


def offline_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE with a generated vocabulary: every byte, plus the words of Qwen-Image's prompt template
    and a few frequent prompt words built by merges (so they are one token each, as with the real vocabulary); the
    special tokens of Qwen2.5-VL. Other words are read byte by byte."""
    byte_chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    merges: list[str] = []
    for word in QWEN_TEMPLATE_WORDS + QWEN_PROMPT_WORDS:
        pieces = [byte_chars[b] for b in word.encode("utf-8")]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = (current, piece)
            if merge not in merges:
                merges.append(merge)
            current += piece
            vocab.setdefault(current, len(vocab))
    for token in QWEN_SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    OFFLINE_TOKENIZERS.add(tokenizer)
    return tokenizer


# The warnings that prompt encoding gives, per prompt, when a prompt is longer than the text encoders' lengths:
# transformers' tokenizer (on diffusers' untruncated length check) and diffusers' Flux pipeline (CLIP and T5).
TRUNCATION_WARNINGS = {
    "transformers.tokenization_utils_base": "Token indices sequence length is longer than the specified maximum",
    "diffusers.pipelines.flux.pipeline_flux": "The following part of your input was truncated because",
}
OFFLINE_TOKENIZERS: weakref.WeakSet = weakref.WeakSet()  # made by offline_clip_tokenizer / offline_t5_tokenizer


PROMPT_ENCODERS = {"_get_clip_prompt_embeds": "tokenizer", "_get_t5_prompt_embeds": "tokenizer_2"}  # FluxPipeline's


class DropOfflineTruncationWarnings(logging.Filter):
    """Drops a truncation warning when the tokenizer that gives it, or the one whose output the pipeline checks,
    is one of the offline tokenizers here (found as the `self` of the nearest tokenizer or prompt-encoding frame
    among the callers); other tokenizers keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(tuple(TRUNCATION_WARNINGS.values())):
            return True
        frame = sys._getframe(1)
        for _ in range(12):  # logging's own frames, then the tokenizer's or the pipeline's method
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            attribute = PROMPT_ENCODERS.get(frame.f_code.co_name)
            tokenizer = getattr(owner, attribute, None) if attribute else owner
            if attribute or hasattr(tokenizer, "model_max_length"):
                try:
                    return tokenizer not in OFFLINE_TOKENIZERS
                except TypeError:  # not weak-referenceable: not ours
                    return True
            frame = frame.f_back
        return True


for _name in TRUNCATION_WARNINGS:
    logging.getLogger(_name).addFilter(DropOfflineTruncationWarnings())


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, notice: bool = True,
                        kontext: bool = False) -> FluxPipeline:
    """The miniature FLUX pipeline: deterministic seeded random init, no downloads, CPU-fast. `notice` prints
    one line saying what its images are. `kontext`: the same components in FLUX.1-Kontext's pipeline, which edits
    an input image (its tokens are appended to the image tokens)."""
    if notice:
        name = "tiny:flux-kontext: miniature FLUX.1-Kontext" if kontext else "tiny: miniature FLUX"
        print(f"[load] {name} with RANDOM WEIGHTS for tests and smoke runs: images are noise by design, "
              f"and prompts are cut at {CLIP_MAX_LENGTH} CLIP and --max_sequence_length T5 tokens (default "
              f"{TINY_MAX_SEQUENCE_LENGTH}) of offline tokenizers that read most words letter by letter")
    pipe = (FluxKontextPipeline if kontext else FluxPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["flux-dev"]),
        vae=_seeded(seed + 1, lambda: AutoencoderKL(**TINY_VAE)),
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**TINY_CLIP))),
        tokenizer=offline_clip_tokenizer(),
        text_encoder_2=_seeded(seed + 3, lambda: T5EncoderModel(T5Config(**TINY_T5))),
        tokenizer_2=offline_t5_tokenizer(TINY_MAX_SEQUENCE_LENGTH),
        transformer=_seeded(seed + 4, lambda: FluxTransformer2DModel(**TINY_TRANSFORMER)),
    )
    return cast_like_from_pretrained(pipe, dtype)


def build_tiny_qwen_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, notice: bool = True
                             ) -> QwenImagePipeline:
    """The miniature Qwen-Image pipeline (diffusers' QwenImagePipeline): seeded random init through the real classes,
    offline tokenizer, CPU-fast."""
    if notice:
        print("[load] tiny:qwen-image: miniature Qwen-Image with RANDOM WEIGHTS for tests and smoke runs: images are "
              "noise by design; an offline tokenizer reads most words byte by byte")
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["qwen-image"]),
        vae=_seeded(seed + 1, lambda: AutoencoderKLQwenImage(**TINY_QWEN_VAE)),
        text_encoder=_seeded(seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(_qwen_text_config(TINY_QWEN_TEXT))),
        tokenizer=offline_qwen_tokenizer(),
        transformer=_seeded(seed + 4, lambda: QwenImageTransformer2DModel(**TINY_QWEN_TRANSFORMER)),
    )
    return cast_like_from_pretrained(pipe, dtype)


def _qwen_text_config(values: dict) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL's config with the offline tokenizer's special-token ids (a vocabulary at least that large)."""
    tokenizer = offline_qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
            ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"))}
    text = dict(values["text_config"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    text.setdefault("vocab_size", len(tokenizer))
    vocab = max(text["vocab_size"], len(tokenizer))
    text["vocab_size"] = vocab
    rest = {k: v for k, v in values.items() if k not in ("text_config", "vision_config")}
    rest["vocab_size"] = vocab
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(values["vision_config"]), **ids, **rest)


def build_random_pipeline(variant: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                          seed: int = 0):
    """Full-size `variant` (FLUX.1 "flux-dev", "flux-schnell" or "flux-kontext", or "qwen-image") with random
    weights, initialised on `device`.

    Initialising ~17 B parameters (FLUX.1; Qwen-Image ~29 B with its text encoder) on a CPU takes many minutes; on
    the GPU it takes seconds. They are created directly in `dtype`: a float32 init would need ~67 GB before the cast.
    """
    if variant not in RANDOM_VARIANTS:
        raise ValueError(f"unknown random variant {variant!r}: use one of "
                         f"{', '.join('random:' + v for v in RANDOM_VARIANTS)}")
    guidance = variant in ("flux-dev", "flux-kontext")
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if variant == "qwen-image":
                return cast_like_from_pretrained(QwenImagePipeline(
                    scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant]),
                    vae=_seeded(seed + 1, lambda: AutoencoderKLQwenImage(**FULL_QWEN_VAE)),
                    text_encoder=_seeded(seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(
                        _qwen_text_config(FULL_QWEN_TEXT))),
                    tokenizer=offline_qwen_tokenizer(),
                    transformer=_seeded(seed + 4, lambda: QwenImageTransformer2DModel(**FULL_QWEN_TRANSFORMER)),
                ), dtype)
            pipe = (FluxKontextPipeline if variant == "flux-kontext" else FluxPipeline)(
                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant]),
                vae=_seeded(seed + 1, lambda: AutoencoderKL(**FULL_VAE)),
                text_encoder=_seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**FULL_CLIP))),
                tokenizer=offline_clip_tokenizer(),
                text_encoder_2=_seeded(seed + 3, lambda: T5EncoderModel(T5Config(**FULL_T5))),
                tokenizer_2=offline_t5_tokenizer(512 if guidance else 256),
                transformer=_seeded(seed + 4, lambda: FluxTransformer2DModel(**FULL_TRANSFORMER,
                                                                              guidance_embeds=guidance)),
            )
    finally:
        torch.set_default_dtype(previous_dtype)
    return cast_like_from_pretrained(pipe, dtype)


def cast_like_from_pretrained(pipe: FluxPipeline, dtype: torch.dtype) -> FluxPipeline:
    """Cast to `dtype` and switch every model to eval mode, as `from_pretrained` leaves them.

    This is why a naively built pipeline does not survive `save_pretrained` + `from_pretrained`: models
    constructed from a config start in *training* mode, so T5's dropout (rate 0.1) perturbs the text
    embeddings at random, and the image differs from the reloaded (eval-mode) pipeline's even for the
    same seed. (bf16/fp32 only: for fp16, `from_pretrained` would also keep T5's `wo` in float32.)
    """
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            # nn.Module.to, not ModelMixin.to: the latter warns about fp32-kept modules even when there are none.
            torch.nn.Module.to(module, dtype=dtype).eval()
    return pipe

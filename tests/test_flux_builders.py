import numpy as np
import torch

from utils.flux_builders import build_tiny_pipeline, offline_clip_tokenizer, offline_t5_tokenizer
from diffusers import FluxPipeline
from utils.pipeline_utils import load_pipeline


def _image(pipe, seed=0, prompt="a photo of a red cat"):
    return pipe(prompt, height=64, width=64, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=32,
                generator=torch.manual_seed(seed), output_type="np").images[0]


def test_offline_tokenizers_encode_real_lengths():
    clip = offline_clip_tokenizer()
    ids = clip("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == clip.bos_token_id
    t5 = offline_t5_tokenizer(512)
    ids = t5("a photo of a cat", padding="max_length", max_length=512).input_ids
    assert len(ids) == 512 and t5.eos_token_id in ids and len(set(ids)) > 3


def test_tiny_build_is_deterministic_and_seed_dependent():
    a = build_tiny_pipeline(seed=0)
    b = build_tiny_pipeline(seed=0)
    c = build_tiny_pipeline(seed=1)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        pa = torch.cat([p.flatten() for p in getattr(a, name).parameters()])
        assert torch.equal(pa, torch.cat([p.flatten() for p in getattr(b, name).parameters()]))
        assert not torch.equal(pa, torch.cat([p.flatten() for p in getattr(c, name).parameters()]))
    assert not any(m.training for m in a.components.values() if isinstance(m, torch.nn.Module))


def test_same_seed_same_image_and_other_seed_differs():
    pipe = build_tiny_pipeline(seed=0)
    first, second, other = _image(pipe, 0), _image(pipe, 0), _image(pipe, 1)
    assert first.shape == (64, 64, 3) and first.std() > 0.01
    assert np.array_equal(first, second)
    assert np.abs(first - other).mean() > 1e-3


def test_save_load_round_trip_gives_identical_image(tmp_path, make_args):
    # Two traps make a naive round trip differ: models built from a config start in train mode (T5
    # dropout), and mmap-loaded weights sit at unaligned addresses where CPU GEMMs round differently.
    for dtype, flags in ((torch.float32, ["--disable_bf16"]), (torch.bfloat16, [])):
        pipe = build_tiny_pipeline(seed=0, dtype=dtype)
        before = _image(pipe)
        pipe.save_pretrained(tmp_path / str(dtype))
        loaded = load_pipeline(make_args("--ckpt", str(tmp_path / str(dtype)), *flags))
        assert isinstance(loaded, FluxPipeline) and loaded.transformer.dtype == dtype
        assert np.array_equal(before, _image(loaded)), dtype


def test_random_full_size_architectures_match_flux1():
    # Built on the meta device: real configs and parameter counts, no memory or time spent.
    from utils.flux_builders import build_random_pipeline

    dev = build_random_pipeline("flux-dev", device="meta")
    schnell = build_random_pipeline("flux-schnell", device="meta")
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 11.85e9 < n_params(dev.transformer) < 11.95e9  # FLUX.1-dev: 11.9 B
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert 4.7e9 < n_params(dev.text_encoder_2) < 4.8e9  # T5-v1.1-XXL encoder
    assert 120e6 < n_params(dev.text_encoder) < 125e6  # CLIP-L text tower
    assert dev.transformer.dtype == torch.bfloat16 and dev.vae_scale_factor == 8
    assert dev.tokenizer_2.model_max_length == 512 and schnell.tokenizer_2.model_max_length == 256
    assert schnell.scheduler.config.shift == 1.0 and not schnell.scheduler.config.use_dynamic_shifting


def test_tiny_pipeline_says_what_its_images_are_and_its_truncation_warnings_are_left_out(capsys):
    import copy
    import logging

    long_prompt = "a photo of a red cat " * 8  # past 77 CLIP and 32 T5 tokens of the letter-level tokenizers
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handlers = [(logging.getLogger(name), Keep()) for name in ("diffusers.pipelines.flux.pipeline_flux",
                                                                 "transformers.tokenization_utils_base")]
    for logger, handler in handlers:
        logger.addHandler(handler)
    try:
        pipe = build_tiny_pipeline(seed=0)
        assert "[load] tiny: miniature FLUX with RANDOM WEIGHTS" in capsys.readouterr().out
        _image(pipe, prompt=long_prompt)
        assert records == []
        pipe.tokenizer_2 = copy.deepcopy(pipe.tokenizer_2)  # not one of the offline tokenizers: its warnings stay
        _image(pipe, prompt=long_prompt)
        assert any("truncated because `max_sequence_length` is set to" in r for r in records), records
        assert not any("CLIP can only handle" in r for r in records)  # the CLIP tokenizer is still the offline one
    finally:
        for logger, handler in handlers:
            logger.removeHandler(handler)
    build_tiny_pipeline(seed=0, notice=False)
    assert capsys.readouterr().out == ""

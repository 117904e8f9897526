"""The checks of the flags alone (utils/benchmark_utils.py): --ckpt values, integer ranges, help texts, one-line
errors, the download hint, the filters of third-party import notices; gen_image.py's output-file check."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import gen_image
from utils import benchmark_utils
from utils.benchmark_utils import check_args, check_ckpt, create_parser, hub_download_hint, resolved_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_ckpt_values_that_cannot_load_anywhere_are_refused_with_the_reason(tmp_path):
    for good in ("tiny", "random:flux-dev", "random:flux-schnell", "black-forest-labs/FLUX.1-dev",
                 "black-forest-labs/FLUX.1-Kontext-dev", "gpt2"):
        check_ckpt(good)  # a Hugging Face id is looked up when the pipeline loads
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe/model_index.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_text("")
    check_ckpt(str(tmp_path / "pipe"))
    for bad, message in (("/path/that/does/not/exist", "no such folder"), ("./missing", "no such folder"),
                         ("../missing", "no such folder"), ("~/surely-not-here-flux", "no such folder"),
                         ("a/b/c", "no such folder"), (str(tmp_path / "empty"), "no model_index.json"),
                         (str(tmp_path / "weights.safetensors"), "a file, not a pipeline folder"),
                         ("random:flux-pro", "unknown random architecture"), ("my model", "not 'tiny'"),
                         ("org/name with space", "not 'tiny'")):
        with pytest.raises(ValueError, match=message):
            check_ckpt(bad)


def test_download_hint_names_the_cli_that_the_pinned_hub_installs():
    hint = hub_download_hint("black-forest-labs/FLUX.1-dev")
    assert "hf download black-forest-labs/FLUX.1-dev --local-dir /path/to/FLUX.1-dev" in hint
    assert "`hf auth login`" in hint and "huggingface-cli" not in hint
    assert "--ckpt /path/to/FLUX.1-dev" in hint


def test_flag_checks_before_the_heavy_imports():
    parse = lambda *flags: resolved_defaults(create_parser().parse_args(["--ckpt", "tiny", *flags]))  # noqa: E731
    check_args(parse())
    for flags, message in ((["--height", "72"], "multiples of 16"), (["--width", "0"], "multiples of 16"),
                           (["--cache_mode", "taylor", "--interval", "0"], "--interval must be >= 1"),
                           (["--cache_mode", "hicache", "--first_enhance", "-1"], "--first_enhance must be >= 0"),
                           (["--chipmunk_config", "nope.yml"], "--chipmunk_config nope.yml: no such file"),
                           (["--cache_dit_config", "nope.yaml"], "--cache_dit_config nope.yaml: no such file")):
        with pytest.raises(ValueError, match=message):
            check_args(parse(*flags))
    check_args(parse("--interval", "0"))  # caching off: the interval is not used


@pytest.mark.parametrize("flags, message", [
    (["--warmup_runs", "-1"], "argument --warmup_runs: must be an integer >= 0 (got -1)"),
    (["--num_runs", "0"], "argument --num_runs: must be an integer >= 1 (got 0)"),
    (["--num_inference_steps", "0"], "argument --num_inference_steps: must be an integer >= 1 (got 0)"),
    (["--max_sequence_length", "0"], "argument --max_sequence_length: must be an integer from 1 to 512 (got 0)"),
    (["--max_sequence_length", "513"], "argument --max_sequence_length: must be an integer from 1 to 512 (got 513)"),
    (["--num_runs", "many"], "argument --num_runs: invalid int value: 'many'"),
])
def test_out_of_range_counts_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as err:
        create_parser().parse_args(flags)
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"{Path(sys.argv[0]).name}: error: {message}"]


def test_every_flag_has_help_and_no_default_that_says_nothing():
    text = create_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in create_parser()._actions:
        assert action.help, action.dest
    assert "the text prompt (default: A cat playing with a ball of yarn)" in " ".join(text.split())
    assert "default 28 (dev/kontext), 4 (schnell/tiny)" in " ".join(text.split())
    assert "with Chipmunk or a scheduled feature cache (fora, taylor, hicache) one graph per step kind; CUDA only" in " ".join(text.split())


def test_gen_image_refuses_an_output_file_it_could_not_save(tmp_path, capsys):
    for path, message in ((tmp_path / "no/such/dir/cat.png", "does not exist"), (tmp_path, "a folder"),
                          (tmp_path / "cat.xyz", "unknown image format '.xyz'")):
        with pytest.raises(SystemExit):
            gen_image.main(["--ckpt", "tiny", "--output-file", str(path)])
        assert message in capsys.readouterr().err
    gen_image.check_output_file(str(tmp_path / "cat.png"))


def test_import_notices_of_torchao_and_diffusers_are_dropped_and_others_kept():
    import enum

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    pytree, quantizer = (logging.getLogger(name) for name, _, _ in benchmark_utils.IMPORT_NOTICES)
    for logger in (pytree, quantizer):
        logger.addHandler(Keep())
    ours = enum.Enum("Ours", "A")
    torchao_enum = enum.Enum("KernelPreference", "AUTO", module="torchao.quantization.quantize_.common")
    message = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
               "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future release.")
    pytree.warning(message, torchao_enum)
    pytree.warning(message, ours)  # anyone else's registration is still reported
    quantizer.warning("Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized "
                      "with `torchao`")
    quantizer.warning("Unable to load something else")
    assert records == [message % ours, "Unable to load something else"]


def test_commands_start_without_third_party_notices():
    """gen_image.py's imports (the stack included): nothing of torch's, torchao's or diffusers' import notices."""
    result = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['gen_image.py']; import gen_image; "
                             "import utils.pipeline_utils, utils.flux_builders"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_the_fastest_preset_sets_its_flags_and_a_given_flag_still_wins():
    parse = lambda *flags: create_parser().parse_args(["--ckpt", "random:flux-dev", *flags])  # noqa: E731
    preset = vars(parse("--preset", "fastest"))
    assert {k: preset[k] for k in benchmark_utils.PRESETS["fastest"]} == benchmark_utils.PRESETS["fastest"]
    assert preset["cache_mode"] == "hicache" and preset["interval"] == 7 and preset["compile_mode"] == "reduce-overhead"
    given = parse("--interval", "5", "--preset", "fastest", "--compile_mode", "default")
    assert (given.interval, given.compile_mode, given.fa3_fp8) == (5, "default", True)
    plain = parse()  # without the preset every flag keeps its own default
    assert (plain.cache_mode, plain.interval, plain.fa3_fp8, plain.compile_mode) == ("none", 5, False, "default")
    with pytest.raises(SystemExit):
        parse("--preset", "fast")


def test_the_fastest_preset_is_a_valid_stack_on_a_gpu_host_and_refused_on_cpu_with_the_fix():
    from utils.pipeline_utils import StackError, validate_args
    from utils.sweep import parse_variant_args, refused_on_a_cuda_host

    assert refused_on_a_cuda_host(["--ckpt", "random:flux-dev", "--preset", "fastest"]) is None
    refusal = refused_on_a_cuda_host(["--ckpt", "random:flux-dev", "--preset", "fastest", "--cache_mode", "fbcache"])
    assert "data-dependent" in refusal and "scheduled cache" in refusal
    assert parse_variant_args(["--ckpt", "tiny", "--preset", "fastest"], "sweep").cache_mode == "hicache"
    with pytest.raises(StackError, match="drop --preset"):
        validate_args(resolved_defaults(create_parser().parse_args(["--ckpt", "tiny", "--device", "cpu",
                                                                    "--preset", "fastest"])))

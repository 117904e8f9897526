import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The Triton kernel checks under tests/interpreted need TRITON_INTERPRET=1 before Triton is first imported, so they
# are collected only in a run started with it (tests/test_chipmunk_kernels.py starts one).
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreted"]

from utils.benchmark_utils import create_parser, resolved_defaults  # noqa: E402


def tiny_args(*extra: str):
    """Parsed, defaulted args for the tiny pipeline on CPU (fp32 unless a test asks for bf16)."""
    return resolved_defaults(create_parser().parse_args(["--ckpt", "tiny", "--device", "cpu", *extra]))


@pytest.fixture
def make_args():
    return tiny_args


@pytest.fixture
def float8_on_cpu(monkeypatch):
    """torchao.quantization, with its sm_89+ check bypassed: quantizing weights (and torch's CPU _scaled_mm)
    works on CPU, so the float8 plumbing can be tested here."""
    quantization = pytest.importorskip("torchao.quantization", reason="torchao is in requirements.txt")
    import torchao.float8.inference as float8_inference
    from torchao.quantization import quant_api

    for mod in (float8_inference, quant_api):
        if hasattr(mod, "_check_hardware_support"):
            monkeypatch.setattr(mod, "_check_hardware_support", lambda *a, **k: None)
    return quantization

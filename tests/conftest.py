import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from utils.benchmark_utils import create_parser, resolved_defaults  # noqa: E402


def tiny_args(*extra: str):
    """Parsed, defaulted args for the tiny pipeline on CPU (fp32 unless a test asks for bf16)."""
    return resolved_defaults(create_parser().parse_args(["--ckpt", "tiny", "--device", "cpu", *extra]))


@pytest.fixture
def make_args():
    return tiny_args

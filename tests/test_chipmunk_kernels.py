"""The Triton kernels (Chipmunk's, utils/chipmunk/kernels.py, and the forecast window's) on a machine without a GPU: the checks under
tests/interpreted, which compare the kernels with the PyTorch reference through Triton's CPU interpreter, run here in
one interpreter process started with TRITON_INTERPRET=1 (it must be set before Triton is imported, and importing the
pipeline's modules costs ~12 s a process); and the launch decisions that need no kernel run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED_TESTS = 46  # tests/interpreted: 38 in test_kernels.py (with their parameters), 4 in test_layers_on_kernels.py,
#                       4 in test_forecast_window.py


def test_the_kernels_match_the_reference_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton comes with the CUDA build of torch that requirements.txt installs")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: this run collects tests/interpreted itself (tests/conftest.py)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/interpreted"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    summary = re.search(r"^=*\s*(\d+) passed[^\n]*$", result.stdout, re.MULTILINE)
    assert summary and int(summary.group(1)) == INTERPRETED_TESTS, output[-3000:]
    assert not re.search(r"\b\d+ (skipped|xfailed|xpassed|deselected)\b", summary.group(0)), summary.group(0)


def test_the_tma_kernels_are_the_default_only_where_tma_exists():
    """sparse_mlp(tma=None), the layers' call, takes the TMA kernels on Hopper only: never for CPU tensors (the
    interpreter tests both paths explicitly). The decision needs no Triton, so this runs everywhere."""
    from utils.chipmunk import kernels

    assert kernels.tma_by_default(torch.randn(2, 64, 32)) is False


def test_without_a_gpu_or_the_interpreter_the_kernels_say_why_they_are_unavailable():
    from utils.chipmunk import kernels, layers

    if torch.cuda.is_available() or kernels.INTERPRET:
        pytest.skip("a CUDA device or TRITON_INTERPRET=1 makes the kernels available here")
    assert not kernels.TRITON_AVAILABLE and layers.triton_kernels() is None
    assert kernels.UNAVAILABLE_REASON.startswith(("no CUDA device (set TRITON_INTERPRET=1", "triton import failed"))

#!/usr/bin/env bash
# Download, on a machine with internet, the Python wheels that an offline GPU node with only PyTorch lacks
# (diffusers, torchao, FlashAttention-3, cache-dit and the metric packages) into .whl/ at the project root
# (git-ignored). Copy the project with .whl/ to the node; there, `source scripts/gpu_env.sh` installs them into
# /tmp/site, or install them yourself:
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# The node's Python decides the wheels: PYTHON_VERSION (default 3.12) names it. Extra requirements can follow:
#   scripts/download_wheels.sh [requirement ...]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
pkgs=(diffusers==0.42.1 importlib_metadata torchao==0.18.0 fa3-fwd==0.0.3 cache-dit==1.5.3
      torch-fidelity lpips open-clip-torch ftfy wcwidth image-reward==1.5 "$@")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
du -sh .whl

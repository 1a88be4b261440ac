#!/usr/bin/env bash
# Installs the peer engines of benchmarks/run.py, each into its own virtual environment under
# benchmarks/_work/venvs/ (never into the project's environment):
#
#   colbert   colbert-ai 0.2.x PLAID (its faiss-cpu extra) + the CPU torch wheel + ninja for its
#             C++ kernels (compiled on first use, by benchmarks/peers/colbert_runner.py warm-up)
#   fastplaid fast-plaid + exactly the torch its version suffix names (1.7.0.2110 <-> torch 2.11.0;
#             another torch crashes it). torch 2.11.0 from PyPI is the CUDA build: a multi-GB
#             download, but it runs on CPU.
#
# Usage: bash benchmarks/peers/install.sh [colbert] [fastplaid]      (default: both)
# Env:   PYTHON (default python3), COLBERT_SPEC, COLBERT_TORCH, FASTPLAID_SPEC, FASTPLAID_TORCH
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENVS="$HERE/../_work/venvs"
PY="${PYTHON:-python3}"
COLBERT_SPEC="${COLBERT_SPEC:-colbert-ai[faiss-cpu]==0.2.22}"
COLBERT_TORCH="${COLBERT_TORCH:-torch==2.13.0}"
FASTPLAID_SPEC="${FASTPLAID_SPEC:-fast-plaid==1.7.0.2110}"
FASTPLAID_TORCH="${FASTPLAID_TORCH:-torch==2.11.0}"
which="${*:-colbert fastplaid}"
mkdir -p "$VENVS"

mkvenv() {  # mkvenv NAME -> path of its python
    [ -x "$VENVS/$1/bin/python" ] || "$PY" -m venv "$VENVS/$1"
    "$VENVS/$1/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
}

for name in $which; do
  case "$name" in
    colbert)
      mkvenv colbert
      # CPU torch first, so colbert-ai's bare torch requirement is already met (no CUDA build).
      "$VENVS/colbert/bin/python" -m pip install -q "$COLBERT_TORCH"
      "$VENVS/colbert/bin/python" -m pip install -q "$COLBERT_SPEC" ninja numpy
      "$VENVS/colbert/bin/python" -c "import colbert, torch, faiss; print('colbert-ai ok, torch', torch.__version__, 'faiss', faiss.__version__)"
      ;;
    fastplaid)
      mkvenv fastplaid
      # This machine's pip config may cap torch with a constraints file; that cap is for the
      # project's environment, not this one: ignore it here only.
      PIP_CONSTRAINT= "$VENVS/fastplaid/bin/python" -m pip install -q --constraint /dev/null "$FASTPLAID_TORCH" "$FASTPLAID_SPEC" numpy
      "$VENVS/fastplaid/bin/python" -c "import torch, fast_plaid; from fast_plaid import search; print('fast-plaid ok, torch', torch.__version__)"
      ;;
    *) echo "unknown peer: $name (colbert, fastplaid)" >&2; exit 2 ;;
  esac
done

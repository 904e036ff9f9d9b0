#!/usr/bin/env bash
# The CUDA path, checked in one short run (< 4 min on one GPU): the GPU bench at a moderate size and the
# precision tests (fp16 on CUDA keeps the tiny models' labels). Needs python3 with torch, torchvision,
# transformers, numpy, pillow, pytest and cachetools (pure Python; installed from $WHEELS, default .gpu-wheels/,
# when missing: `pip download cachetools==8.0.2 -d .gpu-wheels` on a machine with PyPI). Exits non-zero without
# CUDA. Writes its output to $OUT/gpu_check.log too when $OUT is set.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=.
if [[ -n "${OUT:-}" ]]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY: nothing to check" >&2
    exit 1
fi
if ! "$PY" -c "import cachetools" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links "${WHEELS:-.gpu-wheels}" cachetools || {
        echo "gpu_check: cachetools is missing and not in ${WHEELS:-.gpu-wheels}/ (see the header)" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, torchvision, transformers; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)"
rc=0
timeout 150 "$PY" bench/gpu.py --images 16 --crops 20 || rc=$?
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_precision.py -k "keeps_the_labels or resolves" || rc=$?
echo "gpu_check: exit $rc"
exit "$rc"

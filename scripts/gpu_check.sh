#!/usr/bin/env bash
# One prepared run of the CUDA paths and benchmarks on a lent GPU machine (see the device tool's README):
# the GPU-marked tests and the rasterizer, SV3D, NeRF and refinement benchmarks; results in $OUT (or ./gpu_check_out).
# Usage on the device machine, from the repository root:  bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
{
  nvidia-smi -L || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"
# Missing pure-Python dependencies travel as wheels in .whl/ (device README); install them if present.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.txt"
timeout 120 $PY scripts/bench_raster.py 2>&1 | tee "$OUT/bench_raster.txt"
timeout 200 $PY scripts/bench_sv3d.py --size full 2>&1 | tee "$OUT/bench_sv3d.txt"
timeout 120 $PY scripts/bench_nerf.py --max-steps 3000 2>&1 | tee "$OUT/bench_nerf.txt"
timeout 200 $PY scripts/bench_refine.py --full 2>&1 | tee "$OUT/bench_refine.txt"

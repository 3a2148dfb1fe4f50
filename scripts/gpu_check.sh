#!/usr/bin/env bash
# One prepared run of the CUDA paths and benchmarks on a lent GPU machine (see the device tool's README), in
# order of what the open issues need, each part bounded so that the whole ends before BUDGET seconds:
#   1. nerfacc's CUDA extension is built in the background from the start (its log: nerfacc_build.txt);
#   2. the GPU-marked tests (CUDA vs CPU parity of the rasterizer, marching tets, hash grid, bake, SV3D bf16);
#   3. bench_refine.py: one DMTet step at the CUDA defaults (FULL=1: also 1000 steps with 21 views at 576^2);
#   4. the nerfacc estimator test, once the extension is built, and the NeRF field throughput (PyTorch vs
#      the fused Triton kernels);
#   5. (PARTS=profile) scripts/profile_steps.py: torch.profiler tables of NeRF and DMTet steps;
#      (PARTS=oracle) scripts/check_nerf_oracle.py on $OBJECTS, once per entry of ORACLE_STEPS;
#      `sv3d eval --mode oracle` with the CUDA defaults over the test objects (eval.json: each finished
#      object's metrics and timings), for as long as the budget allows;
#   6. (PARTS=sds) one masked-SDS step with a random-weight SV3D model of the real size (measured: 1.35 s).
# Missing pure-Python packages travel as wheels in .whl/; the SV3D fixtures as .fx/ ($SV3D_FIXTURES).
# Usage on the device machine, from the repository root:  bash scripts/gpu_check.sh   (results in $OUT)
# Subsets: PARTS="tests eval" OBJECTS="mug" BUDGET=300 bash scripts/gpu_check.sh.
# Preparing here (once a session; both folders are in .git/info/exclude, carry them: carry=[".whl", ".fx"]):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
#     manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl trimesh pypng hydra-core omegaconf
#     hydra-joblib-launcher hydra-submitit-launcher submitit nerfacc diffusers importlib_metadata xatlas
#     fast_simplification   (the versions of .venv);  pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
#   mkdir -p .fx/sv3d_tiny && cp ../shared/fixtures/sv3d_tiny/{README.md,*_p.*,input_image.png,...} .fx/sv3d_tiny
# On an H200 (2026-11-28) the nerfacc build took 71-83 s; tests ~60 s; bench_refine --full over 160 s;
# the eval of one object at the CUDA defaults over 2.5 minutes (NeRF ~150 s then). Size BUDGET to the lease.
# On 2026-12-05 an H100 stopped answering during one 540-second call (PARTS="tests refine profile estimator
# nerf oracle", OBJECTS=mug, ORACLE_STEPS="default 1000") and nothing came back: $OUT returns only when a
# call ends. Prefer two shorter calls, each of whose results come back on their own, e.g.
#   BUDGET=230 PARTS="tests refine profile" bash scripts/gpu_check.sh
#   BUDGET=300 PARTS="estimator nerf oracle" OBJECTS=mug ORACLE_STEPS="default 1000" bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_check_out}
BUDGET=${BUDGET:-560}
EVAL_RESERVE=${EVAL_RESERVE:-20}  # seconds kept for the parts after the eval
OBJECTS=${OBJECTS:-"mug plate bowl blob checker internal"}
PARTS=${PARTS:-"tests refine estimator nerf eval"}  # a subset reruns only those parts
TESTS=${TESTS:-"tests/test_bake.py tests/test_rasterizer.py tests/test_marching_tets.py tests/test_dmtet.py
  tests/test_nerf_encoding.py tests/test_nerf_fit.py tests/test_sv3d_pipeline.py"}
want() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
LOG="$OUT/log.txt"
left() { echo $((BUDGET - SECONDS)); }
part() { echo "=== [$SECONDS s] $*" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
[ -d .fx ] && export SV3D_FIXTURES="$PWD/.fx"
# Run from the source tree (no pip install here): the config package `sv3d.configs` is configs/ (pyproject).
[ -e sv3d/configs ] || ln -s ../configs sv3d/configs
{
  nvidia-smi -L || true
  $PY -c "import torch, diffusers, transformers, nerfacc, trimesh; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  nproc; which nvcc ffmpeg || true
} 2>&1 | tee -a "$LOG"

# imageio-ffmpeg's 68 MB wheel does not fit the transfer: videos go through OpenCV (on the image) here:
# $PY /tmp/cv2run.py ARGS runs the CLI, $PY /tmp/cv2run.py SCRIPT.py ARGS a script.
cat >/tmp/cv2run.py <<'EOF'
import sys
from pathlib import Path

import cv2
import numpy as np

import sv3d.video


def write_video(path, frames, fps=7, background=1.0):
    if frames.shape[-1] == 4:
        frames = frames[..., :3] * frames[..., 3:] + background * (1.0 - frames[..., 3:])
    data = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, data.shape[2:0:-1])
    for frame in data:
        writer.write(frame[..., ::-1].copy())
    writer.release()
    return Path(path)


sv3d.video.write_video = write_video
if sys.argv[1].endswith(".py"):  # a script, else the CLI
    import runpy

    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    from sv3d.cli import main

    sys.exit(main(sys.argv[1:]))
EOF

part "nerfacc CUDA extension build (background)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-12}
( start=$SECONDS; $PY -c "from nerfacc.cuda._backend import _C; print('nerfacc _C:', _C)" >"$OUT/nerfacc_build.txt" 2>&1
  echo "build finished after $((SECONDS - start)) s" >>"$OUT/nerfacc_build.txt" ) &
BUILD=$!

if want tests; then
  part "GPU tests (all but the nerfacc estimator)"
  timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider -k "not estimator" $TESTS >"$OUT/pytest_gpu.txt" 2>&1
  tail -3 "$OUT/pytest_gpu.txt" | tee -a "$LOG"
fi

if want refine; then
  part "bench_refine${FULL:+ --full}"
  timeout 260 $PY scripts/bench_refine.py ${FULL:+--full} 2>&1 | tail -8 | tee -a "$LOG"
fi

if want profile; then
  part "profile_steps: where a NeRF and a DMTet step's time goes (waits for the nerfacc build)"
  while kill -0 $BUILD 2>/dev/null && [ "$(left)" -gt 120 ]; do sleep 5; done
  timeout 150 $PY scripts/profile_steps.py --out "$OUT" 2>&1 | grep -E "^(median|NeRF|DMTet)" | tee -a "$LOG"
fi

if want estimator; then
  part "wait for the nerfacc build, then its estimator test"
  while kill -0 $BUILD 2>/dev/null && [ "$(left)" -gt 120 ]; do sleep 5; done
  tail -3 "$OUT/nerfacc_build.txt" | tee -a "$LOG"
  timeout 60 $PY -m pytest -q -m gpu -p no:cacheprovider -k estimator tests/test_nerf_field.py >"$OUT/pytest_estimator.txt" 2>&1
  tail -3 "$OUT/pytest_estimator.txt" | tee -a "$LOG"
fi

if want nerf; then
  part "bench_nerf: field throughput"
  timeout 60 $PY scripts/bench_nerf.py --skip-fit --skip-steps 2>&1 | tail -6 | tee -a "$LOG"
fi

if want oracle; then
  for steps in ${ORACLE_STEPS:-default}; do
    [ "$(left)" -gt 90 ] || break
    part "check_nerf_oracle $OBJECTS, steps $steps (issue 4's NeRF check at the CUDA defaults)"
    extra=""; [ "$steps" = default ] || extra="--steps $steps"
    timeout $(($(left) - 30)) $PY /tmp/cv2run.py scripts/check_nerf_oracle.py $OBJECTS $extra \
      --json "$OUT/oracle_$steps.json" 2>&1 | grep -v -E "^\s*$" | tail -12 | tee -a "$LOG"
  done
fi

if want eval; then
part "sv3d eval --mode oracle, CUDA defaults (until $((BUDGET - EVAL_RESERVE)) s)"
$PY -c "from sv3d.testing.objects import write_test_objects; write_test_objects('/tmp/gso', '$OBJECTS'.split())"
printf "%s\n" $OBJECTS >/tmp/objects.txt
timeout $(($(left) - EVAL_RESERVE)) $PY /tmp/cv2run.py eval /tmp/gso -o /tmp/eval --objects /tmp/objects.txt 2>&1 \
  | tr '\r' '\n' | grep -v -E "^\s*$" | tail -40 >"$OUT/eval_log.txt"
tail -5 "$OUT/eval_log.txt" | tee -a "$LOG"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import json, os
from pathlib import Path
out = {}
for m in sorted(Path("/tmp/eval").glob("*/metrics.json")):
    d = json.loads(m.read_text())
    for extra in ("nerf/fit_nerf.json", "refine/refine.json"):
        f = m.parent / extra
        if f.is_file():
            d[extra] = json.loads(f.read_text())
    out[m.parent.name] = d
    print(m.parent.name, d.get("status"), {k: d.get(k, {}).get("chamfer") for k in ("final", "nerf", "hull")},
          d.get("timings"))
Path(os.environ.get("OUT", "gpu_check_out"), "eval.json").write_text(json.dumps(out, indent=1, default=str))
EOF
fi

part "one SDS step with a random-weight SV3D model of the real size"
if want sds && [ "$(left)" -gt 60 ]; then
  timeout $(($(left) - 10)) $PY scripts/bench_refine.py --steps 2 --sds-random full 2>&1 | tail -5 | tee -a "$LOG"
fi
part "done"

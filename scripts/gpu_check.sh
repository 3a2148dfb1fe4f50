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
# $OUT gets at most 8 files back: log.txt (summaries), parts.txt (every part's whole output, appended as it
# comes, so a part cut off keeps its lines), nerfacc_build.txt, the two profile tables, oracle_<steps>.json
# (rewritten after each object) and eval.json (each object's metrics, or its error's last lines). Each part's
# timeout is its own limit or what BUDGET has left, whichever is less; a part without 10 s left is skipped.
# Usage on the device machine, from the repository root:  bash scripts/gpu_check.sh   (results in $OUT)
# Subsets: PARTS="tests eval" OBJECTS="mug" BUDGET=300 bash scripts/gpu_check.sh. A dry run of the plumbing
# on a CPU machine: REQUIRE_CUDA=0 PY=.venv/bin/python OUT=/tmp/gc PARTS=tests BUDGET=60 bash ...
# Preparing here (once a session; both folders are in .gitignore, carry them: carry=[".whl", ".fx"]):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
#     manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl trimesh pypng hydra-core omegaconf
#     hydra-joblib-launcher hydra-submitit-launcher submitit nerfacc diffusers xatlas
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
BUDGET=${BUDGET:-300}  # a call's timeout_s should be BUDGET + ~60 s; leave the lease 4 min for a rerun
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
PARTS_LOG="$OUT/parts.txt"  # every part's whole output, appended as it comes (a part cut off keeps its lines)
left() { echo $((BUDGET - SECONDS)); }
part() { echo "=== [$SECONDS s] $*" | tee -a "$LOG" "$PARTS_LOG"; }
# cap N: a part's timeout, N seconds or what the budget has left less 15 s; empty (skip the part) below 10 s
cap() { local t=$(( $1 < $(left) - 15 ? $1 : $(left) - 15 )); [ "$t" -ge 10 ] && echo "$t"; }
# run_part N CMD...: CMD under cap N, its output appended to parts.txt as it comes; prints it (for a tail)
run_part() {
  local t; t=$(cap "$1") || { echo "skipped: $(left) s left" | tee -a "$PARTS_LOG"; return 0; }; shift
  timeout "$t" "$@" 2>&1 | tee -a "$PARTS_LOG"
}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3 | tee -a "$LOG"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
  echo "no .whl/ carried: the packages the image lacks are missing" | tee -a "$LOG"
fi
# A half-finished nerfacc build of an earlier call leaves torch's lock file, on which every later load waits
# forever: no build of ours runs yet, so any lock is stale.
rm -f ~/.cache/torch_extensions/*/nerfacc_cuda/lock
[ -d .fx ] && export SV3D_FIXTURES="$PWD/.fx"
# Run from the source tree (no pip install here): the config package `sv3d.configs` is configs/ (pyproject).
[ -e sv3d/configs ] || ln -s ../configs sv3d/configs
{
  nvidia-smi -L || true
  $PY -c "import torch, diffusers, transformers, nerfacc, trimesh; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  nproc; which nvcc ffmpeg || true
} 2>&1 | tee -a "$LOG"
if ! $PY -c "import torch, diffusers, transformers, nerfacc, trimesh, hydra, omegaconf, png, xatlas, \
fast_simplification; assert torch.cuda.is_available() or '${REQUIRE_CUDA:-1}' == '0', 'no CUDA'" >>"$LOG" 2>&1; then
  echo "missing packages or no CUDA (see above): stopping before the parts" | tee -a "$LOG"; exit 3
fi

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
  run_part 150 $PY -m pytest -q -m gpu -p no:cacheprovider -k "not estimator" $TESTS | tail -3 | tee -a "$LOG"
fi

if want refine; then
  part "bench_refine${FULL:+ --full}"
  run_part 260 $PY scripts/bench_refine.py ${FULL:+--full} | tail -8 | tee -a "$LOG"
fi

if want profile; then
  part "profile_steps: where a NeRF and a DMTet step's time goes (waits for the nerfacc build)"
  while kill -0 $BUILD 2>/dev/null && [ "$(left)" -gt 120 ]; do sleep 5; done
  run_part 150 $PY scripts/profile_steps.py --out "$OUT" | grep -E "^(median|NeRF|DMTet)|Error" | tee -a "$LOG"
fi

if want estimator; then
  part "wait for the nerfacc build, then its estimator test"
  while kill -0 $BUILD 2>/dev/null && [ "$(left)" -gt 120 ]; do sleep 5; done
  tail -3 "$OUT/nerfacc_build.txt" | tee -a "$LOG"
  run_part 60 $PY -m pytest -q -m gpu -p no:cacheprovider -k estimator tests/test_nerf_field.py | tail -3 | tee -a "$LOG"
fi

if want nerf; then
  part "bench_nerf: field throughput"
  run_part 60 $PY scripts/bench_nerf.py --skip-fit --skip-steps | tail -6 | tee -a "$LOG"
fi

if want oracle; then
  for steps in ${ORACLE_STEPS:-default}; do
    [ "$(left)" -gt 90 ] || break
    part "check_nerf_oracle $OBJECTS, steps $steps (issue 4's NeRF check at the CUDA defaults)"
    extra=""; [ "$steps" = default ] || extra="--steps $steps"
    run_part $(($(left) - 30)) $PY /tmp/cv2run.py scripts/check_nerf_oracle.py $OBJECTS $extra \
      --json "$OUT/oracle_$steps.json" | grep -v -E "^\s*$" | tail -12 | tee -a "$LOG"
  done
fi

if want eval; then
part "sv3d eval --mode oracle, CUDA defaults (until $((BUDGET - EVAL_RESERVE)) s)"
$PY -c "from sv3d.testing.objects import write_test_objects; write_test_objects('/tmp/gso', '$OBJECTS'.split())"
printf "%s\n" $OBJECTS >/tmp/objects.txt
run_part $(($(left) - EVAL_RESERVE)) $PY /tmp/cv2run.py eval /tmp/gso -o /tmp/eval --objects /tmp/objects.txt \
  | tr '\r' '\n' | grep -v -E "^\s*$" | tail -5 | tee -a "$LOG"
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
for e in sorted(Path("/tmp/eval").glob("*/error.txt")):  # a failed object's traceback (never ran on a GPU)
    out.setdefault(e.parent.name, {})["error"] = e.read_text().splitlines()[-30:]
    print(e.parent.name, "failed:", e.read_text().strip().splitlines()[-1:])
Path(os.environ.get("OUT", "gpu_check_out"), "eval.json").write_text(json.dumps(out, indent=1, default=str))
EOF
fi

part "one SDS step with a random-weight SV3D model of the real size"
if want sds && [ "$(left)" -gt 60 ]; then
  run_part $(($(left) - 10)) $PY scripts/bench_refine.py --steps 2 --sds-random full | tail -5 | tee -a "$LOG"
fi
part "done"

"""Hydra entry point for `sv3d eval`: `python scripts/evaluate.py eval.dataset=PATH [overrides]`.

Writes `<object>/metrics.json` and `summary.{json,md,csv,png}` into Hydra's run directory (or `output=`);
in a multirun each job writes its own, and `--aggregate SWEEP_DIR` gathers them into one table
(`sweep_summary.csv` / `.md`, the overrides as columns). Examples:

    python scripts/evaluate.py eval.dataset=gso preset=cpu
    python scripts/evaluate.py -m eval.dataset=gso preset=toy hydra/launcher=joblib \\
        refine.refine.tet.resolution=20,24 nerf.train.steps=20,40
    python scripts/evaluate.py -m eval.dataset=gso preset=gpu hydra/launcher=slurm \\
        hydra.launcher.partition=gpu refine.refine.tet.resolution=96,128
    python scripts/evaluate.py --aggregate multirun/2024-01-01/12-00-00
"""

from __future__ import annotations

import math
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from sv3d.config import eval_config, job_output_dir, record_job_overrides, run_config, to_container
from sv3d.entry_points import fail_job, job_failed, run_script
from sv3d.errors import Sv3dError, one_line
from sv3d.evaluate import aggregate_sweep, evaluate_dataset

# the library's refusals name sv3d eval's flags
WORDING = {"--force": "force=true", "--rescore": "eval.rescore=true", "another -o": "another output="}


@hydra.main(version_base="1.3", config_path="pkg://sv3d.configs", config_name="config")
def main(cfg) -> float | None:
    if cfg.eval.dataset is None:
        fail_job("evaluate.py", "give the dataset, e.g. eval.dataset=path/to/gso")
        return math.inf  # a multirun's job: the worst value for a sweeper
    objects = to_container(cfg.eval.objects)
    if isinstance(objects, str):
        objects = hydra.utils.to_absolute_path(objects)
    try:
        output = job_output_dir(cfg)
        result = evaluate_dataset(
            hydra.utils.to_absolute_path(cfg.eval.dataset),
            output,
            eval_config(cfg),
            run_config(cfg),
            objects=objects,
            force=bool(cfg.force or cfg.eval.force),
            rescore=bool(cfg.eval.rescore),
        )
        record_job_overrides(cfg, output)  # after the results: a refused job leaves the old labels
    except (Sv3dError, OSError) as exc:  # bad input, or a file it cannot read or write: one line, exit 2
        fail_job("evaluate.py", one_line(exc), wording=WORDING)
        return math.inf
    s = result.summary
    print(f"evaluated {s['n_ok']} of {s['n_objects']} objects; wrote {output / 'summary.md'}")
    failed = [r["object"] for r in s["objects"] if r.get("status") == "error"]
    if failed:
        print(f"evaluate.py: {len(failed)} object(s) failed: {', '.join(failed)}", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # as `sv3d eval`; a sweep's other jobs go on
            sys.exit(1)
        job_failed(1)  # the sweep's exit status, at its end
    mean = s["aggregate"]["mean"]["final"]["chamfer"]  # what a sweeper would minimise
    # the mean covers the finished objects only: a config that fails the hard ones must not look better
    return math.inf if mean is None or s["n_failed"] else mean


def _aggregate(argv: list[str]) -> None:
    if len(argv) != 1:
        print("evaluate.py: error: --aggregate takes one sweep directory", file=sys.stderr)
        sys.exit(2)
    try:
        paths = aggregate_sweep(argv[0])
    except (Sv3dError, OSError) as exc:  # bad input, or a file it cannot read or write: one line, exit 2
        print(f"evaluate.py: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {paths['csv']} and {paths['md']}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--aggregate":
        _aggregate(sys.argv[2:])
    else:
        run_script(main, "evaluate.py")

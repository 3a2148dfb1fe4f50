"""Errors and exit status of the Hydra entry points (`scripts/*.py`), in a single run and in a sweep.

A job's error is one line on stderr. In a single run the script exits with its status then. In a multirun
the job ends there and the sweep's other jobs go on: `sys.exit` inside a job raised SystemExit through
Hydra's basic launcher, which stopped the whole sweep at the first failed job. `run_script` gives the
sweep's exit status at its end for jobs run in its own process (the basic launcher's); a job run in
another process (the joblib and submitit launchers: `hydra/launcher=local`, `slurm`) raises `JobFailed`
after its line, so that its launcher records it as failed and Hydra reports it when the sweep ends (a
returned job counted as finished: the sweep exited 0). Ctrl-C is one line, exit 130, instead of a
traceback.
The library's messages name the `sv3d` command's flags; `wording` restates them as the script's keys.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["JobFailed", "fail_job", "job_failed", "run_script"]

_failed: list[tuple[str, int]] = []  # (job, exit status) of this process's failed multirun jobs
_script_pid: int | None = None  # the process that called run_script


class JobFailed(Exception):
    """A multirun job failed in another process than the script's (its line is printed already)."""


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def fail_job(script: str, message: str, status: int = 2, wording: Mapping[str, str] | None = None) -> None:
    """Print `script: error: message` (`wording`'s replacements made); exit with `status` in a single
    run, return in a multirun (the job ends, the sweep goes on, `run_script` exits with it at the end)."""
    from hydra.core.hydra_config import HydraConfig

    for flag, key in (wording or {}).items():
        message = message.replace(flag, key)
    if not _in_multirun():
        print(f"{script}: error: {message}", file=sys.stderr)
        sys.exit(status)
    print(f"{script}: error: job {HydraConfig.get().job.num}: {message}", file=sys.stderr)
    job_failed(status)


def job_failed(status: int) -> None:
    """Record that this multirun job failed (its own message printed): `run_script` exits with `status`."""
    from hydra.core.hydra_config import HydraConfig

    job = f"job {HydraConfig.get().job.num}"
    if os.getpid() != _script_pid:  # a launcher's worker: only a raised job counts as failed there
        raise JobFailed(f"{job} failed (exit status {status})")
    _failed.append((job, status))


def run_script(main: Callable[[], Any], script: str) -> None:
    """Run a Hydra-decorated `main`: exit 130 with one line on Ctrl-C; after a multirun in which jobs
    failed, name them and exit with the highest of their statuses."""
    global _script_pid
    _script_pid = os.getpid()
    try:
        main()
    except KeyboardInterrupt:
        print(f"{script}: interrupted (what was finished is kept)", file=sys.stderr)
        sys.exit(130)
    if _failed:
        print(f"{script}: {len(_failed)} job(s) failed: {', '.join(j for j, _ in _failed)}", file=sys.stderr)
        sys.exit(max(status for _, status in _failed))

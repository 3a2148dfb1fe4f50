"""The Hydra config tree (configs/) and its conversion to dataclasses (sv3d/config.py); sweeps of
scripts/evaluate.py through submitit's local executor, aggregated into one table.

As lightning-hydra-template's tests: every config group composes, with every preset, and converts; the
stage groups mirror the dataclasses field for field; a multirun at toy sizes runs end to end.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from sv3d.config import (
    apply_overrides,
    compose_config,
    eval_config,
    fit_nerf_config,
    orbit_config,
    refine_stage_config,
    run_config,
)
from sv3d.errors import InputError
from sv3d.evaluate import EvalConfig
from sv3d.fit_nerf import FitNerfConfig, default_fit_config
from sv3d.refine_stage import RefineStageConfig, default_refine_config
from sv3d.run import RunConfig
from sv3d.testing.objects import write_test_objects

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PRESETS = ("auto", "cpu", "gpu", "paper", "toy")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_converts(preset):
    cfg = compose_config([f"preset={preset}"])
    nerf, refine, ev, run = fit_nerf_config(cfg), refine_stage_config(cfg), eval_config(cfg), run_config(cfg)
    assert isinstance(nerf, FitNerfConfig) and isinstance(refine, RefineStageConfig)
    assert isinstance(ev, EvalConfig) and isinstance(run, RunConfig)
    assert run.nerf == nerf and run.refine == refine and run.orbit == orbit_config(cfg)
    assert nerf.device == refine.device == run.device == str(cfg.device)
    assert isinstance(nerf.level_candidates, tuple) and isinstance(ev.fscore_thresholds, tuple)


def test_paper_preset_is_the_papers_settings():
    cfg = compose_config(["preset=paper"])
    nerf, refine = fit_nerf_config(cfg), refine_stage_config(cfg)
    assert nerf.train.steps == 600  # ~600 NeRF steps
    r = refine.refine
    assert (r.steps, r.render_resolution, r.tet.resolution) == (1000, 576, 128)
    assert round(r.steps * r.sds_fraction) == 200 and refine.sds == "on"  # SDS in the last 200 steps
    assert eval_config(cfg).render.resolution == 576


def test_null_keeps_the_device_defaults():
    # preset=auto pins nothing: the groups' nulls give exactly the library's defaults for this device
    cfg = compose_config(["preset=auto", "device=cpu"])
    cpu = torch.device("cpu")
    expected_nerf, expected_refine = default_fit_config(cpu), default_refine_config(cpu)
    expected_nerf.device = expected_refine.device = "cpu"
    assert fit_nerf_config(cfg) == expected_nerf
    assert refine_stage_config(cfg) == expected_refine
    # cuda defaults are chosen from the name, without needing a GPU to convert the config
    gpu = fit_nerf_config(compose_config(["preset=auto", "device=cuda"]))
    assert gpu.train.steps == default_fit_config(torch.device("cuda")).train.steps == 3000


def _keys(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in node.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def _fields(obj, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _fields(value, f"{prefix}{f.name}.")
        elif f.name != "device":  # the top-level `device` key sets it
            out.add(f"{prefix}{f.name}")
    return out


@pytest.mark.parametrize(
    "group,config",
    [("nerf", FitNerfConfig()), ("refine", RefineStageConfig())],
)
def test_stage_groups_mirror_the_dataclasses(group, config):
    values = yaml.safe_load((CONFIGS / group / "default.yaml").read_text())
    assert _keys(values) == _fields(config)


def test_overrides_are_typed_and_checked():
    cfg = compose_config(["preset=toy", "nerf.train.lr=1", "refine.refine.tet.resolution=24"])
    nerf = fit_nerf_config(cfg)
    assert nerf.train.lr == 1.0 and isinstance(nerf.train.lr, float)
    assert refine_stage_config(cfg).refine.tet.resolution == 24
    with pytest.raises(InputError, match="nerf.train.steps: expected an integer"):
        fit_nerf_config(compose_config(["nerf.train.steps=many"]))
    with pytest.raises(InputError, match=r"nerf\.train\.stepz: unknown key"):
        apply_overrides(FitNerfConfig(), {"train": {"stepz": 3}}, "nerf")
    with pytest.raises(InputError, match="nerf.train.field.encoder: n_levels must be >= 1"):
        apply_overrides(FitNerfConfig(), {"train": {"field": {"encoder": {"n_levels": 0}}}}, "nerf")
    # The CPU defaults derive the hash grid's growth from finest_resolution: an override of the growth
    # itself was silently undone; now it stands, and the two together are refused.
    from sv3d.fit_nerf import default_fit_config

    cpu = default_fit_config(torch.device("cpu"))
    grown = apply_overrides(cpu, {"train": {"field": {"encoder": {"per_level_scale": 1.3}}}}, "nerf")
    encoder = grown.train.field.encoder
    assert encoder.per_level_scale == 1.3 and encoder.finest_resolution is None
    with pytest.raises(InputError, match="give per_level_scale or finest_resolution, not both"):
        both = {"per_level_scale": 1.3, "finest_resolution": 512}
        apply_overrides(cpu, {"train": {"field": {"encoder": both}}}, "nerf")
    with pytest.raises(InputError, match="--mode must be one of"):
        eval_config(compose_config(["eval.mode=sideways"]))
    assert refine_stage_config(compose_config(["refine.open_cavities=always"])).open_cavities == "always"
    with pytest.raises(InputError, match="open_cavities must be one of auto, always, never, got 'yes'"):
        refine_stage_config(compose_config(["refine.open_cavities=yes"]))
    with pytest.raises(InputError, match=r"refine\.open_cavities: expected auto, always or never"):
        refine_stage_config(compose_config(["refine.open_cavities=false"]))  # the old boolean


@pytest.mark.parametrize(
    "override, message",
    [  # each was a ValueError or TypeError traceback, or (21.5) silently 21
        ("refine.cleanup.target_faces=many", r"refine\.cleanup\.target_faces: expected an integer"),
        ("nerf.train.field.encoder.finest_resolution=2k", r"encoder\.finest_resolution: expected an integer"),
        ("sv3d.render.resolution=hi", r"sv3d\.render\.resolution: expected an integer"),
        ("sv3d.render.views=21.5", r"sv3d\.render\.views: expected an integer"),
        ("sv3d.elevation_deg=high", r"sv3d\.elevation_deg: expected a number"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_error_naming_its_key(override, message):
    with pytest.raises(InputError, match=message):
        cfg = compose_config(["preset=gpu", override])
        refine_stage_config(cfg), fit_nerf_config(cfg), eval_config(cfg)
    cfg = compose_config(
        ["refine.cleanup.target_faces=5000", "nerf.train.field.encoder.finest_resolution=512"]
    )
    assert refine_stage_config(cfg).cleanup.target_faces == 5000  # a field whose default is None
    assert fit_nerf_config(cfg).train.field.encoder.finest_resolution == 512


@pytest.mark.parametrize("launcher", ["joblib", "local", "submitit_local", "submitit_slurm", "slurm"])
def test_launcher_configs_compose(launcher):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sv3d.configs", version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert ("Joblib" in target) == (launcher in ("joblib", "local"))
    if launcher == "slurm":  # our SLURM defaults over submitit_slurm's; partition left to the user
        assert target.endswith("SlurmLauncher") and cfg.hydra.launcher.partition is None
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 720


@pytest.mark.slow  # two real toy evaluations in subprocesses: ~1-5 min on 2 cores, depending on the load
def test_sweep_with_submitit_local_aggregates_into_one_table(tmp_path):
    """`scripts/evaluate.py -m` over two tet resolutions, real toy pipeline, submitit's local executor."""
    data = tmp_path / "gso"
    write_test_objects(data, ["blob"])
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "evaluate.py"),
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        f"eval.dataset={data}",
        "preset=toy",
        "refine.refine.tet.resolution=20,24",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two jobs at once on two cores
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "summary.json").is_file(), proc.stderr[-3000:]
        assert (sweep / job / "blob" / "metrics.json").is_file()

    agg = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--aggregate", str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert agg.returncode == 0, agg.stderr
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert sorted(r["refine.refine.tet.resolution"] for r in rows) == ["20", "24"]
    assert all(r["n_ok"] == "1" and float(r["chamfer"]) > 0 and r["chamfer_hull"] for r in rows)


def test_config_tree_is_found_from_an_uninstalled_checkout(monkeypatch):
    """Run from a source tree on PYTHONPATH (no `sv3d.configs` package, as on a GPU machine that only gets
    the checkout) the checkout's configs/ is used; with neither, a one-line InputError says what to do."""
    import sv3d.config as config_module

    monkeypatch.setattr(config_module, "CONFIG_MODULE", "sv3d.no_such_configs")
    cfg = config_module.compose_config(["preset=cpu"])
    assert cfg.device == "cpu"
    monkeypatch.setattr(config_module, "CHECKOUT_CONFIGS", config_module.CHECKOUT_CONFIGS / "missing")
    with pytest.raises(InputError, match="not installed"):
        config_module.compose_config([])


def test_evaluate_script_exits_1_when_an_object_failed(tmp_path: Path):
    """As `sv3d eval`: the batch is written, the failed objects are named and the status is 1."""
    broken = tmp_path / "gso" / "broken" / "meshes"
    broken.mkdir(parents=True)
    (broken / "model.obj").write_text("v 0 0 garbage\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), f"eval.dataset={tmp_path / 'gso'}"]
        + [f"output={out}", "preset=toy", "device=cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "evaluate.py: 1 object(s) failed: broken" in proc.stderr
    assert (out / "summary.json").is_file() and (out / "broken" / "error.txt").is_file()


def test_hydra_scripts_turn_file_errors_into_one_line(tmp_path: Path):
    """An output under a file was Hydra's "Error executing job" traceback (exit 1): now one line, exit 2."""
    objects = write_test_objects(tmp_path / "gso", names=["blob"])
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_orbit.py"), f"mesh={objects['blob']}"]
        + [f"output={blocker / 'orbit'}", "preset=toy", "device=cpu", "sv3d.render.resolution=32"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # Hydra's own outputs/ folder goes there
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("render_orbit.py: error:") and "Traceback" not in proc.stderr, proc.stderr
    # without the mesh: one line, exit 2 as well (it was exit 1)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_orbit.py"), "preset=toy"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("render_orbit.py: error: give the mesh")


def test_multirun_with_a_fixed_output_gives_each_job_its_own_folder(tmp_path: Path):
    """`-m ... output=DIR`: every job wrote into DIR itself (the second orbit replaced the first, or a run
    refused the other's folder); now DIR/<job number>, and an evaluation's overrides beside it."""
    objects = write_test_objects(tmp_path / "gso", names=["blob"])
    out = tmp_path / "orbits"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_orbit.py"), "-m", f"mesh={objects['blob']}"]
        + [f"output={out}", "preset=toy", "device=cpu", "sv3d.render.resolution=32"]
        + ["sv3d.elevation_deg=0,20"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # Hydra's own multirun/ folder goes there
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    elevations = {}
    for job in ("0", "1"):
        frames = json.loads((out / job / "transforms.json").read_text())["frames"]
        elevations[job] = round(float(frames[0]["elevation_deg"]))
    assert sorted(elevations.values()) == [0, 20]


def test_evaluation_jobs_record_their_overrides_under_a_fixed_output(tmp_path: Path):
    """`evaluate.py -m ... output=DIR` jobs write DIR/<n>/.hydra/overrides.yaml, which --aggregate reads."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sv3d.config import job_output_dir, record_job_overrides

    GlobalHydra.instance().clear()
    overrides = ["refine.refine.tet.resolution=24", f"output={tmp_path / 'sweep'}"]
    with initialize_config_module(config_module="sv3d.configs", version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    cfg.hydra.mode, cfg.hydra.job.num = RunMode.MULTIRUN, 3
    cfg.hydra.overrides.task = overrides
    HydraConfig.instance().set_config(cfg)
    try:
        job = job_output_dir(cfg)
        assert not job.exists()  # nothing written before the job's work
        record_job_overrides(cfg, job)
    finally:
        HydraConfig.instance().cfg = None
    assert job == tmp_path / "sweep" / "3"
    from sv3d.evaluate import _overrides

    assert _overrides(job)["refine.refine.tet.resolution"] == "24"


def test_a_failed_job_does_not_stop_the_sweep_and_force_replaces(tmp_path: Path):
    """A job's error ended it with sys.exit, which stopped the basic launcher's whole sweep: now the other
    jobs run and the sweep exits 2 at its end, naming the failed job. The library's refusals name the
    script's key (force=true), which the script honours."""
    objects = write_test_objects(tmp_path / "gso", names=["blob"])
    out = tmp_path / "orbits"
    script = [sys.executable, str(ROOT / "scripts" / "render_orbit.py")]
    sizes = ["preset=toy", "device=cpu", "sv3d.render.resolution=32"]
    proc = subprocess.run(
        [*script, "-m", f"mesh={tmp_path / 'missing.obj'},{objects['blob']}", f"output={out}", *sizes],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "render_orbit.py: error: job 0: " in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "render_orbit.py: 1 job(s) failed: job 0"
    assert (out / "1" / "transforms.json").is_file()  # the job after the failed one ran

    again = [*script, f"mesh={objects['blob']}", f"output={out / '1'}", *sizes]
    proc = subprocess.run(again, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "(use force=true to replace it)" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([*again, "force=true"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_failed_job_of_a_parallel_sweep_fails_the_sweep(tmp_path: Path):
    """With the joblib launcher (hydra/launcher=local) the jobs run in worker processes: a job that printed
    its error and returned counted as finished, and the sweep exited 0. It raises JobFailed there now."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    objects = write_test_objects(tmp_path / "gso", names=["blob"])
    out = tmp_path / "orbits"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_orbit.py"), "-m", "hydra/launcher=local"]
        + [f"mesh={tmp_path / 'missing.obj'},{objects['blob']}", f"output={out}", "preset=toy", "device=cpu"]
        + ["sv3d.render.resolution=32"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "render_orbit.py: error: job 0: " in proc.stderr and "JobFailed: job 0 failed" in proc.stderr
    assert (out / "1" / "transforms.json").is_file()


def test_ctrl_c_in_a_script_is_one_line(capsys):
    from sv3d.entry_points import run_script

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run_script(interrupted, "evaluate.py")
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "evaluate.py: interrupted (what was finished is kept)\n"

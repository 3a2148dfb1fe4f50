"""`sv3d run` end to end at toy sizes with the tiny SV3D checkpoint: outputs, resume, refusal, the
consistency flag, Ctrl-C, bad input (nothing created), running out of disk, and `run_from_orbit`."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sv3d.run as run_module
from sv3d.cli import main
from sv3d.errors import InputError
from sv3d.fit_nerf import FitNerfConfig
from sv3d.refine_stage import RefineStageConfig
from sv3d.render_orbit import RenderOrbitConfig, render_orbit
from sv3d.run import RunConfig, run_from_orbit
from sv3d.testing.images import rgba_disc
from sv3d.testing.objects import write_test_object
from sv3d.testing.toy_configs import toy_fit_config, toy_refine_config


def toy_nerf(device) -> FitNerfConfig:
    # 20 steps leave a nearly flat density (measured 0.68 to 0.74): dense candidate levels
    return toy_fit_config(steps=20, checkpoint_every=10, n_levels=300)


def toy_refine(device) -> RefineStageConfig:
    # The tiny model's frames are noise that covers the whole frame, so its NeRF can fill the field's whole
    # sphere (radius 0.55): a wider tet grid keeps that init inside it
    return toy_refine_config(tet_bound=0.8)


@pytest.fixture(autouse=True)
def toy_defaults(monkeypatch):
    """The device defaults of the CLI and of run.py shrunk to toy sizes."""
    monkeypatch.setattr(run_module, "default_fit_config", toy_nerf)
    monkeypatch.setattr(run_module, "default_refine_config", toy_refine)


def run_args(fixtures: Path, image: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(image),
        "-o",
        str(out),
        "--checkpoint",
        str(fixtures / "tiny_sv3d_p.safetensors"),
        "--sgm-config",
        str(fixtures / "tiny_sv3d_p.yaml"),
        "--resolution",
        "64",
        "--steps",
        "2",
        "--turntable-frames",
        "6",
        "--turntable-resolution",
        "32",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_run(sv3d_tiny: Path, tmp_path_factory) -> dict:
    """One full run, in two calls: first flagged (threshold 99 dB, no random-weight orbit reaches it) and
    stopped after the NeRF, then continued with --allow-inconsistent."""
    root = tmp_path_factory.mktemp("run")
    image, out = rgba_disc(root / "disc.png"), root / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(run_module, "default_fit_config", toy_nerf)
    mp.setattr(run_module, "default_refine_config", toy_refine)
    try:
        args = run_args(sv3d_tiny, image, out, "--consistency-threshold", "99")
        first = main(args)
        flagged_record = json.loads((out / "run.json").read_text())
        second = main([*args, "--allow-inconsistent"])
    finally:
        mp.undo()
    return {
        "root": root,
        "image": image,
        "out": out,
        "args": args,
        "codes": (first, second),
        "flagged_record": flagged_record,
    }


def test_a_flagged_orbit_stops_after_the_nerf_then_continues_when_allowed(tiny_run):
    assert tiny_run["codes"] == (2, 0)
    first = tiny_run["flagged_record"]
    assert first["flagged"] is True and first["finished_stages"] == ["orbit", "nerf", "consistency"]
    assert "not 3D-consistent" in first["status"]
    score = first["consistency"]
    assert score["masked_psnr_db"] < 99 and len(score["per_view_db"]) == 21
    record = json.loads((tiny_run["out"] / "run.json").read_text())
    assert record["flagged"] is True and record["status"] == "finished"
    assert record["stages"]["nerf"] == first["stages"]["nerf"]  # not redone by the second call


def test_run_writes_every_output_and_a_complete_record(tiny_run, sv3d_tiny: Path):
    out = tiny_run["out"]
    for name in (
        "mesh.glb",
        "turntable.mp4",
        "orbit/transforms.json",
        "nerf/field.safetensors",
        "refine/mesh.glb",
    ):
        assert (out / name).is_file(), name
    assert (out / "mesh.glb").read_bytes() == (out / "refine/mesh.glb").read_bytes()
    record = json.loads((out / "run.json").read_text())
    assert record["finished_stages"] == list(run_module.STAGES)
    assert set(record["versions"]) >= {"torch", "diffusers", "transformers", "nerfacc", "numpy", "sv3d"}
    import hashlib

    expected = hashlib.sha256((sv3d_tiny / "tiny_sv3d_p.safetensors").read_bytes()).hexdigest()
    assert record["checkpoint"]["sha256"] == expected
    assert record["config"]["nerf"]["train"]["steps"] == 20 and record["seed"] == 0
    for stage in run_module.STAGES:
        timing = record["stages"][stage]
        assert timing["seconds"] > 0 and timing["peak_rss_mb"] > 0 and timing["rss_peak_growth_mb"] >= 0
    assert record["consistency"]["threshold_db"] == 99.0
    # density.npz records the iso-level the mesh was extracted at (the one chosen from the masks)
    from nerf.extract import load_density

    chosen = json.loads((out / "nerf" / "fit_nerf.json").read_text())["level"]
    assert load_density(out / "nerf" / "density.npz")[2] == pytest.approx(chosen)


def _forbid_stages(monkeypatch) -> None:
    """Every stage function fails the test if it is called."""

    def never(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("generate_orbit", "fit_nerf", "refine_stage", "render_turntable"):
        monkeypatch.setattr(run_module, name, never)


def test_rerun_skips_finished_stages(tiny_run, monkeypatch):
    _forbid_stages(monkeypatch)
    before = json.loads((tiny_run["out"] / "run.json").read_text())
    assert main([*tiny_run["args"], "--allow-inconsistent"]) == 0
    after = json.loads((tiny_run["out"] / "run.json").read_text())
    assert after["stages"] == before["stages"]


def test_a_moved_photo_and_output_folder_and_auto_device_resume_the_run(
    tiny_run, tmp_path, monkeypatch, capsys
):
    """The source is compared by content, not by path (a moved evaluation folder's half-done objects were
    "another run"), and the run's device by what it resolves to (--device auto on this CPU machine is cpu)."""
    out, image = tmp_path / "moved", tmp_path / "renamed.png"
    shutil.copytree(tiny_run["out"], out)
    shutil.copyfile(tiny_run["image"], image)
    args = [*tiny_run["args"], "--allow-inconsistent"]
    args[args.index(str(tiny_run["out"]))] = str(out)
    args[args.index(str(tiny_run["image"]))] = str(image)
    if not torch.cuda.is_available():  # the tiny run was made on the CPU: auto picks it here
        args[args.index("--device") + 1] = "auto"
    _forbid_stages(monkeypatch)
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["identity"]["source"]["image"] == str(image.resolve())  # the path now read, recorded
    image.write_bytes(image.read_bytes() + b"\0")  # other bytes: another run
    assert main(args) == 2
    assert "holds another run (different source.image_sha256" in capsys.readouterr().err


def test_another_preprocessing_of_the_same_photo_is_another_run(tiny_run, tmp_path, monkeypatch, capsys):
    """`--background auto` mattes with rembg once it is installed: the same photo gives the orbit stage
    another input, so the run's identity holds the preprocessed input's hash (the photo's and "auto" did not
    change); a record from before without it resumes."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_run["out"], out)
    args = [*tiny_run["args"], "--allow-inconsistent"]
    args[args.index(str(tiny_run["out"]))] = str(out)
    record = json.loads((out / "run.json").read_text())
    del record["identity"]["source"]["conditioning_sha256"]  # as recorded until 2026-12-08
    (out / "run.json").write_text(json.dumps(record))
    _forbid_stages(monkeypatch)
    assert main(args) == 0
    assert "conditioning_sha256" in json.loads((out / "run.json").read_text())["identity"]["source"]
    real = run_module._check_image

    def other_matting(image, orbit):
        rgb, alpha = real(image, orbit)
        return rgb, (alpha * 0.9).round(decimals=3)

    monkeypatch.setattr(run_module, "_check_image", other_matting)
    assert main(args) == 2
    assert "holds another run (different source.conditioning_sha256" in capsys.readouterr().err


def test_a_stage_run_again_makes_the_later_ones_run_again(tiny_run, tmp_path, monkeypatch):
    """Deleting refine/ redid the refinement but kept the top-level mesh.glb and turntable of the old one."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_run["out"], out)
    args = [*tiny_run["args"], "--allow-inconsistent"]
    args[args.index(str(tiny_run["out"]))] = str(out)
    shutil.rmtree(out / "refine")
    _forbid_stages(monkeypatch)
    ran = []

    def refine(orbit_dir, nerf_dir, refine_dir, *a, **k):
        ran.append("refine")
        refine_dir.mkdir()
        shutil.copyfile(out / "mesh.glb", refine_dir / "mesh.glb")

    monkeypatch.setattr(run_module, "refine_stage", refine)
    monkeypatch.setattr(run_module, "render_turntable", lambda *a, **k: ran.append("turntable"))
    assert main(args) == 0
    assert ran == ["refine", "turntable"]  # the export too, though its files were there
    record = json.loads((out / "run.json").read_text())
    assert record["finished_stages"] == ["orbit", "nerf", "consistency", "refine", "export"]


def test_turntable_and_threshold_changes_redo_only_what_they_change(tiny_run, tmp_path, monkeypatch, capsys):
    """Another turntable size or consistency threshold was "another run" (--force: everything again)."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_run["out"], out)
    args = [*tiny_run["args"], "--allow-inconsistent"]
    args[args.index(str(tiny_run["out"]))] = str(out)
    args[args.index("--turntable-resolution") + 1] = "40"
    _forbid_stages(monkeypatch)
    made = []
    monkeypatch.setattr(run_module, "render_turntable", lambda *a, **k: made.append(a[3]))
    assert main([*args, "--consistency-threshold", "99"]) == 0
    assert made == [40]  # the export only, at the new size
    record = json.loads((out / "run.json").read_text())
    assert record["flagged"] and record["consistency"]["threshold_db"] == 99.0  # re-judged, not re-scored
    assert "meshing it anyway" in capsys.readouterr().err


def test_a_changed_config_refuses_and_force_redoes(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run["out"], out)
    args = [*tiny_run["args"], "--allow-inconsistent"]
    args[args.index(str(tiny_run["out"]))] = str(out)
    before = (out / "run.json").read_bytes()
    assert main([*args, "--nerf-steps", "25"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds another run" in err and "steps 20 -> 25" in err and "--force" in err
    assert len(err.splitlines()) == 1 and (out / "run.json").read_bytes() == before

    assert "--force to redo the nerf stage and after (keeping orbit)" in err

    # --force redoes what the change touches: the NeRF and after, not the orbit (it started over, SV3D
    # sampling included); here interrupted as the NeRF stage begins (Ctrl-C)
    calls = []

    def interrupted(*a, **k):
        calls.append(a)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "generate_orbit", lambda *a, **k: pytest.fail("orbit generated again"))
    monkeypatch.setattr(run_module, "fit_nerf", interrupted)
    orbit_before = (out / "orbit" / "transforms.json").read_bytes()
    assert main([*args, "--nerf-steps", "25", "--force"]) == 130
    assert len(calls) == 1 and not (out / "nerf").exists() and not (out / "mesh.glb").exists()
    assert not (out / "refine").exists() and (out / "orbit" / "transforms.json").read_bytes() == orbit_before
    assert not list(out.glob(".replaced-*"))
    record = json.loads((out / "run.json").read_text())
    assert record["finished_stages"] == ["orbit"] and record["status"] == "interrupted in stage nerf"
    assert record["identity"]["config"]["nerf"]["train"]["steps"] == 25  # the record is the new run's

    # a setting of the orbit stage (sampler steps): everything again
    monkeypatch.setattr(run_module, "generate_orbit", interrupted)
    assert main([*args, "--nerf-steps", "25", "--steps", "3", "--force"]) == 130
    assert len(calls) == 2 and not (out / "orbit").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["finished_stages"] == [] and record["status"] == "interrupted in stage orbit"


def test_the_photo_is_preprocessed_once_per_run(sv3d_tiny, tmp_path, monkeypatch):
    """The run checks the photo by preprocessing it before anything exists; the orbit stage takes that
    result (a 48 MP photo's preprocessing takes seconds) instead of doing it again."""
    import sv3d.preprocess

    calls = []
    real = sv3d.preprocess.preprocess_image

    def counted(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sv3d.preprocess, "preprocess_image", counted)
    monkeypatch.setattr(run_module, "fit_nerf", stop)  # stops the run after the orbit stage
    image, out = rgba_disc(tmp_path / "disc.png"), tmp_path / "out"
    assert main(run_args(sv3d_tiny, image, out)) == 130
    assert (out / "orbit" / "transforms.json").is_file() and len(calls) == 1


def test_force_after_a_refine_setting_changed_redoes_only_the_refinement(tiny_run, tmp_path, monkeypatch):
    """A new --refine-steps with --force kept nothing (SV3D sampling and the NeRF fit again): now the orbit,
    the NeRF and the consistency score are kept and the refinement and export run again."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_run["out"], out)
    args = [*tiny_run["args"], "--allow-inconsistent", "--refine-steps", "7", "--force"]
    args[args.index(str(tiny_run["out"]))] = str(out)
    nerf_before = (out / "nerf" / "field.safetensors").read_bytes()
    _forbid_stages(monkeypatch)
    ran = []

    def refine(orbit_dir, nerf_dir, refine_dir, config, *a, **k):
        ran.append(config.refine.steps)
        assert not refine_dir.exists()  # the old refinement's folder is gone
        refine_dir.mkdir()
        shutil.copyfile(out / "nerf" / "mesh.ply", refine_dir / "mesh.glb")

    monkeypatch.setattr(run_module, "refine_stage", refine)
    monkeypatch.setattr(run_module, "render_turntable", lambda *a, **k: ran.append("turntable"))
    assert main(args) == 0
    assert ran == [7, "turntable"] and (out / "nerf" / "field.safetensors").read_bytes() == nerf_before
    record = json.loads((out / "run.json").read_text())
    assert record["finished_stages"] == ["orbit", "nerf", "consistency", "refine", "export"]
    assert record["identity"]["config"]["refine"]["refine"]["steps"] == 7


def test_a_replaced_checkpoint_file_is_noticed(tiny_run, tmp_path, capsys, monkeypatch):
    """The record's checkpoint differs from the file now at its path (size or time changed, so it is hashed
    again): the finished stages are not reused with other weights."""
    _forbid_stages(monkeypatch)
    out = tmp_path / "copy"
    shutil.copytree(tiny_run["out"], out)
    record = json.loads((out / "run.json").read_text())
    record["checkpoint"].update(sha256="0" * 64, mtime_ns=1)  # made with another file at the same path
    (out / "run.json").write_text(json.dumps(record))
    before = (out / "run.json").read_bytes()
    args = [*tiny_run["args"], "--allow-inconsistent"]
    args[args.index(str(tiny_run["out"]))] = str(out)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "made with another file" in err and "--force" in err and len(err.splitlines()) == 1, err
    assert (out / "run.json").read_bytes() == before
    # a changed refine setting as well: the weights are named (it promised to keep the orbit and NeRF)
    assert main([*args, "--refine-steps", "7"]) == 2
    assert "made with another file" in capsys.readouterr().err


def test_a_diffusers_folder_is_identified_by_its_bytes(tmp_path, monkeypatch):
    """A fine-tune of the same sizes is another model (the folder's identity was its files' sizes and
    configs); a copy (new mtimes) is the same; a record of the sizes-only identity (before 2026-12-08) is
    kept while the folder matches it; each file is read once a process, the record spares rereading."""
    folder = tmp_path / "sv3d_diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "SV3D"}')
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\1" * 1000)
    reads = []
    monkeypatch.setattr(run_module, "file_sha256", lambda p: reads.append(p) or hashlib_sha256(p))
    monkeypatch.setattr(run_module, "_HASHED", {})
    first = run_module.checkpoint_identity(folder)
    assert run_module.checkpoint_identity(folder) == first and len(reads) == 2  # two files, read once
    assert run_module.checkpoint_identity(folder, first) == first and len(reads) == 2
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for file in copy.rglob("*"):
        os.utime(file, ns=(0, 10**9))  # other mtimes (copytree keeps them)
    assert run_module.checkpoint_identity(copy)["sha256"] == first["sha256"]
    (copy / ".cache").mkdir()  # huggingface-cli's metadata: not the model
    (copy / ".cache" / "x.metadata").write_text("touched")
    assert run_module.checkpoint_identity(copy)["sha256"] == first["sha256"]
    mtime = weights.stat().st_mtime_ns
    weights.write_bytes(b"\2" * 1000)  # a fine-tune: same names, same sizes, another mtime
    os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))
    tuned = run_module.checkpoint_identity(folder, first)
    assert tuned["sha256"] != first["sha256"]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    old = {"path": str(folder), "method": run_module._SIZES_ONLY}
    old["sha256"] = run_module._sizes_only_digest(folder, files)
    assert run_module.checkpoint_identity(folder, old) == old
    (folder / "model_index.json").write_text('{"_class_name": "SV3D", "other": 1}')
    assert run_module.checkpoint_identity(folder, old)["sha256"] != old["sha256"]


def hashlib_sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "case",
    [
        "missing image",
        "directory as image",
        "corrupt image",
        "garbage checkpoint",
        "other run",
        "bad dtype",
        "missing sgm config",
        "sv3d_u with an orbit",
        "incomplete checkpoint",
    ],
)
def test_bad_input_fails_in_one_line_before_anything_is_created(tiny_run, sv3d_tiny, tmp_path, capsys, case):
    image, out = tiny_run["image"], tmp_path / "out"
    extra: list[str] = []
    if case == "missing image":
        image = tmp_path / "none.png"
    elif case == "directory as image":
        image = tmp_path
    elif case == "corrupt image":
        image = tmp_path / "bad.png"
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
    elif case == "garbage checkpoint":
        garbage = tmp_path / "garbage.safetensors"
        garbage.write_bytes(np.random.default_rng(0).bytes(4096))
        extra = ["--checkpoint", str(garbage)]
    elif case == "bad dtype":
        extra = ["--dtype", "fp16"]
    elif case == "missing sgm config":
        extra = ["--sgm-config", str(tmp_path / "none.yaml")]
    elif case == "sv3d_u with an orbit":
        u = sv3d_tiny / "tiny_sv3d_u"
        extra = ["--checkpoint", f"{u}.safetensors", "--sgm-config", f"{u}.yaml", "--orbit", "sine"]
    elif case == "incomplete checkpoint":  # the UNet alone: found from the file's header
        state = load_file(str(sv3d_tiny / "tiny_sv3d_p.safetensors"))
        unet_only = tmp_path / "unet_only.safetensors"
        save_file({k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}, str(unet_only))
        extra = ["--checkpoint", str(unet_only)]
    elif case == "other run":
        out = tiny_run["out"]  # holds a run with other settings
        extra = ["--steps", "3"]
    listing = sorted(p.name for p in tmp_path.iterdir())
    before = (tiny_run["out"] / "run.json").read_bytes()
    assert main([*run_args(sv3d_tiny, image, out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sv3d: error:") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing created
    assert (tiny_run["out"] / "run.json").read_bytes() == before
    expected = {
        "missing image": "not found",
        "directory as image": "is a directory",
        "corrupt image": "bad.png",
        "garbage checkpoint": "unreadable safetensors",
        "other run": "holds another run",
        "bad dtype": "--dtype must be",
        "missing sgm config": "cannot read the sgm config",
        "sv3d_u with an orbit": "sv3d_u takes no cameras",
        "incomplete checkpoint": "not a complete SV3D checkpoint",
    }[case]
    assert expected in err


def test_force_never_deletes_folders_no_run_made(tiny_run, sv3d_tiny, tmp_path, capsys):
    """A folder without run.json: its own nerf/ (or orbit/, refine/) is not the run's to delete, and the
    refusal no longer suggests --force."""
    out = tmp_path / "work"
    (out / "nerf").mkdir(parents=True)
    (out / "nerf" / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        assert main([*run_args(sv3d_tiny, tiny_run["image"], out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "holds no sv3d run (it holds nerf, which --force would delete)" in err, err
        assert "use an empty or new directory" in err and len(err.splitlines()) == 1
    assert (out / "nerf" / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "nerf"
    ]


def test_an_orbit_runs_folder_may_hold_its_orbit_and_an_interrupted_force_can_be_forced_again(
    tiny_run, sv3d_tiny, tmp_path, monkeypatch
):
    """The demo runs from out/orbit into out: the orbit is the run's input, not a stranger's folder. And a
    --force cut short while it cleared (run.json gone first, then nerf/ ...) left a folder that every later
    command refused: run.json is rewritten as a cleared record instead."""
    from sv3d.run import _check_output

    demo_like = tmp_path / "demo"
    (demo_like / "orbit").mkdir(parents=True)
    (demo_like / "orbit" / "transforms.json").write_text("{}")
    assert _check_output(demo_like, {}, force=True, kind="orbit") == (None, None)
    with pytest.raises(InputError, match="it holds orbit"):
        _check_output(demo_like, {}, force=True, kind="image")

    out = tmp_path / "copy"
    shutil.copytree(tiny_run["out"], out)
    args = [*run_args(sv3d_tiny, tiny_run["image"], out), "--allow-inconsistent", "--steps", "3"]

    def cut(path, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.shutil, "rmtree", cut)
    assert main([*args, "--force"]) == 130  # interrupted while clearing
    assert json.loads((out / "run.json").read_text())["finished_stages"] == []
    monkeypatch.undo()
    monkeypatch.setattr(run_module, "generate_orbit", cut)
    assert main([*args, "--force"]) == 130  # accepted: cleared, then the orbit stage began
    assert not (out / "nerf").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted in stage orbit"


def test_a_full_disk_is_one_line_and_keeps_the_record(tiny_run, sv3d_tiny, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "generate_orbit", full)
    out = tmp_path / "out"
    assert main(run_args(sv3d_tiny, tiny_run["image"], out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the stage's progress line
    assert err.startswith("sv3d: error:") and "no space left on device" in err and "rerun" in err
    record = json.loads((out / "run.json").read_text())
    assert record["finished_stages"] == [] and "no space" in record["status"]


def test_out_of_memory_is_one_line_and_the_record_says_where(
    tiny_run, sv3d_tiny, tmp_path, capsys, monkeypatch
):
    """CUDA out of memory (any exception) left run.json "running" and printed a traceback."""
    import torch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(run_module, "generate_orbit", oom)
    out = tmp_path / "out"
    assert main([*run_args(sv3d_tiny, tiny_run["image"], out), "--offload", "--sds", "off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sv3d: error: stage orbit: out of memory") and "--offload" in err, err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed in stage orbit: out of memory"
    assert record["config"]["orbit"]["offload"] is True and record["config"]["refine"]["sds"] == "off"

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(run_module, "generate_orbit", bug)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback, but the record says where
        main([*run_args(sv3d_tiny, tiny_run["image"], out), "--offload", "--sds", "off"])
    assert json.loads((out / "run.json").read_text())["status"].startswith(
        "failed in stage orbit: ZeroDivision"
    )


@pytest.fixture(scope="module")
def oracle_orbit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oracle")
    obj = write_test_object(root / "objects", "blob")
    return render_orbit(obj, root / "orbit", RenderOrbitConfig(resolution=48, views=21))


@pytest.mark.slow
def test_run_from_orbit_survives_ctrl_c_and_resumes(oracle_orbit: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "oracle_run"
    # 20 toy NeRF steps reproduce even ground-truth frames poorly (measured 11 dB): allowed, for the plumbing
    config = RunConfig(turntable_frames=4, turntable_resolution=32, allow_inconsistent=True, device="cpu")
    real_refine = run_module.refine_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "refine_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_from_orbit(oracle_orbit, out, config, progress=False)
    record = json.loads((out / "run.json").read_text())  # still valid JSON
    assert record["finished_stages"] == ["nerf", "consistency"]
    assert record["status"] == "interrupted in stage refine"
    assert record["source"]["orbit_sha256"] == run_module.orbit_fingerprint(oracle_orbit)

    monkeypatch.setattr(run_module, "refine_stage", real_refine)
    monkeypatch.setattr(run_module, "fit_nerf", lambda *a, **k: pytest.fail("the NeRF stage ran again"))
    result = run_from_orbit(oracle_orbit, out, config, progress=False)
    assert result.mesh_path.is_file() and (out / "turntable.mp4").is_file()
    assert result.summary["finished_stages"] == ["nerf", "consistency", "refine", "export"]
    assert "orbit" not in result.summary["stages"] and not (out / "orbit").exists()
    assert result.flagged == (result.summary["consistency"]["masked_psnr_db"] < 20.0)


def test_an_unknown_open_cavities_mode_stops_a_run_before_any_stage(
    oracle_orbit: Path, tmp_path: Path, monkeypatch
):
    config = RunConfig(refine=RefineStageConfig(open_cavities="yes"), device="cpu")
    monkeypatch.setattr(run_module, "fit_nerf", lambda *a, **k: pytest.fail("the NeRF stage ran"))
    with pytest.raises(InputError, match="open_cavities must be one of auto, always, never, got 'yes'"):
        run_from_orbit(oracle_orbit, tmp_path / "run", config, progress=False)
    assert not (tmp_path / "run").exists()  # nothing created


def test_image_to_mesh_hydra_entry_composes():
    from sv3d.config import compose_config

    module = _load_script("image_to_mesh")
    overrides = ["+image=photo.png", "preset=toy", "sv3d.steps=3", "sv3d.orbit=sine"]
    cfg = compose_config(
        [*overrides, "sv3d.checkpoint=/x/sv3d_p.safetensors", "+run.allow_inconsistent=true"]
    )
    config = module.run_config(cfg)
    assert isinstance(config, RunConfig) and config.allow_inconsistent and cfg.image == "photo.png"
    assert config.orbit.steps == 3 and config.orbit.orbit == "sine" and config.device == "cpu"
    assert config.orbit.checkpoint == "/x/sv3d_p.safetensors" and config.nerf.train.steps == 20  # toy
    # Every key of the sv3d group reaches the orbit stage; an unknown one is refused, not ignored
    more = ["sv3d.dtype=float32", "sv3d.background=plain", "sv3d.offload=true", "sv3d.allow_cpu=true"]
    more += ["sv3d.resolution=256", "sv3d.sgm_config=/x/tiny.yaml"]
    config = module.run_config(compose_config([*overrides, "sv3d.checkpoint=/x/p.safetensors", *more]))
    o = config.orbit
    assert (o.dtype, o.background, o.offload, o.allow_cpu, o.resolution) == (
        "float32",
        "plain",
        True,
        True,
        256,
    )
    import torch

    from sv3d.errors import InputError
    from sv3d.run import _resolve_configs

    with pytest.raises(InputError, match="sv3d.dtypes: unknown key"):
        module.run_config(compose_config([*overrides, "+sv3d.dtypes=float16"]))
    # SDS guides with the orbit's model: its sgm yaml and dtype too (the Hydra config names the checkpoint
    # for both stages, and they were not copied then)
    _resolve_configs(config, torch.device("cpu"))
    assert config.refine.checkpoint == "/x/p.safetensors" and config.refine.sgm_config == "/x/tiny.yaml"
    assert config.refine.dtype == "float32"


def _load_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mirrored_orbit_negates_azimuths_about_the_input_view(oracle_orbit: Path, tmp_path: Path):
    from sv3d.cameras import read_orbit_directory

    check = _load_script("check_azimuth")
    original = read_orbit_directory(oracle_orbit).orbit
    mirrored = read_orbit_directory(check.mirror_orbit_directory(oracle_orbit, tmp_path / "m")).orbit
    a_in = float(original.azimuths_deg[-1])  # 0 deg for render-orbit's default
    # a' = 2 a_in - a: frame 0 at a_in + 360/21 = 17.14 deg goes to -17.14 = 342.86 deg
    expected = (2 * a_in - original.azimuths_deg) % 360.0
    assert np.allclose(mirrored.azimuths_deg.numpy() % 360.0, expected.numpy(), atol=1e-6)
    assert abs(float(mirrored.azimuths_deg[0]) % 360.0 - 342.857) < 1e-2
    assert np.allclose(mirrored.elevations_deg.numpy(), original.elevations_deg.numpy())


@pytest.mark.slow
def test_check_azimuth_end_to_end_with_the_tiny_checkpoint(sv3d_tiny: Path, tmp_path: Path, capsys):
    check = _load_script("check_azimuth")
    image = rgba_disc(tmp_path / "disc.png")
    args = [str(image), "--checkpoint", str(sv3d_tiny / "tiny_sv3d_p.safetensors")]
    args += ["--sgm-config", str(sv3d_tiny / "tiny_sv3d_p.yaml"), "--steps", "2", "--resolution", "64"]
    assert check.main([*args, "-o", str(tmp_path / "out"), "--nerf-steps", "20", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / "check_azimuth.json").read_text())
    assert len(report["masked_psnr_db"]) == 2 and all(np.isfinite(list(report["masked_psnr_db"].values())))
    assert report["verdict"] in capsys.readouterr().out


def test_volume_weight_reaches_the_nerf_stage():
    from sv3d.cli import build_parser, run_config_from_args

    args = build_parser().parse_args(
        ["run", "cup.png", "-o", "out", "--volume-weight", "0.01", "--device", "cpu"]
    )
    assert run_config_from_args(args).nerf.train.volume_weight == 0.01
    args = build_parser().parse_args(["run", "cup.png", "-o", "out", "--device", "cpu"])
    assert run_config_from_args(args).nerf.train.volume_weight == 0.0  # off by default


def test_the_refine_help_states_the_open_cavity_threshold_in_use(capsys):
    """The help quotes the default threshold (it said 10% while the default was 13%)."""
    from sv3d.cli import build_parser
    from sv3d.refine_stage import RefineStageConfig

    with pytest.raises(SystemExit):
        build_parser().parse_args(["refine", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    threshold = round(RefineStageConfig().cavity_gain * 100)
    assert f"at least {threshold}% of the first start's error" in help_text


def test_no_floor_cut_reaches_the_nerf_and_refine_stages():
    from sv3d.cli import build_parser, run_config_from_args

    args = build_parser().parse_args(["run", "cup.png", "-o", "out", "--device", "cpu"])
    config = run_config_from_args(args)
    assert config.nerf.floor_cut and config.refine.refine.floor_cut  # on by default
    args = build_parser().parse_args(["run", "cup.png", "-o", "out", "--no-floor-cut", "--device", "cpu"])
    config = run_config_from_args(args)
    assert not config.nerf.floor_cut and not config.refine.refine.floor_cut
    args = build_parser().parse_args(["refine", "orbit", "--init", "nerf", "-o", "out", "--no-floor-cut"])
    assert args.no_floor_cut


def test_no_shading_reaches_the_refine_stage():
    from sv3d.cli import build_parser, run_config_from_args

    args = build_parser().parse_args(["run", "cup.png", "-o", "out", "--device", "cpu"])
    assert run_config_from_args(args).refine.refine.color.shading  # on by default
    args = build_parser().parse_args(["run", "cup.png", "-o", "out", "--no-shading", "--device", "cpu"])
    assert not run_config_from_args(args).refine.refine.color.shading
    args = build_parser().parse_args(["refine", "orbit", "--init", "nerf", "-o", "out", "--no-shading"])
    assert args.no_shading


def test_the_open_cavity_flags_reach_the_refine_stage(capsys):
    from sv3d.cli import build_parser, run_config_from_args

    def run_mode(*flags: str) -> str:
        args = build_parser().parse_args(["run", "cup.png", "-o", "out", *flags, "--device", "cpu"])
        return run_config_from_args(args).refine.open_cavities

    assert run_mode() == "auto"  # both starts, the open one kept when it fits clearly better
    assert run_mode("--no-open-cavities") == "never"
    assert run_mode("--open-cavities") == "always"
    args = build_parser().parse_args(["refine", "orbit", "--init", "nerf", "-o", "out", "--no-open-cavities"])
    assert args.no_open_cavities and not args.open_cavities
    args = build_parser().parse_args(["refine", "orbit", "--init", "nerf", "-o", "out", "--open-cavities"])
    assert args.open_cavities and not args.no_open_cavities
    for command in (["run", "cup.png"], ["refine", "orbit", "--init", "nerf"]):
        with pytest.raises(SystemExit):  # the two flags exclude each other
            build_parser().parse_args([*command, "-o", "out", "--open-cavities", "--no-open-cavities"])
        assert "not allowed with argument" in capsys.readouterr().err


def test_input_elevation_and_background_reach_the_orbit_stage():
    from sv3d.cli import build_parser, run_config_from_args

    args = build_parser().parse_args(
        ["run", "x.png", "-o", "out", "--input-elevation", "25", "--background", "plain"]
    )
    orbit = run_config_from_args(args).orbit
    assert orbit.input_elevation_deg == 25.0 and orbit.background == "plain"
    orbit = run_config_from_args(build_parser().parse_args(["run", "x.png", "-o", "out"])).orbit
    assert orbit.input_elevation_deg == 10.0 and orbit.background == "auto"


def test_one_dtype_for_the_orbit_and_the_sds_model():
    import torch

    from sv3d.run import _resolve_configs

    config = RunConfig()
    config.orbit.dtype = "float32"
    config.orbit.checkpoint = "model.safetensors"
    _resolve_configs(config, torch.device("cpu"))
    assert config.refine.dtype == "float32" and config.refine.checkpoint == "model.safetensors"

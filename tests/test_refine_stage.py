"""`sv3d refine` at toy sizes: textured files out, one-line errors for bad input, nothing half-written."""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import trimesh

from sv3d.cameras import static_orbit
from sv3d.cli import main
from sv3d.errors import InputError
from sv3d.meshio import load_mesh, load_trimesh
from sv3d.render_orbit import RenderOrbitConfig, render_orbit
from sv3d.testing.objects import write_test_object

TINY = ["--steps", "12", "--resolution", "48", "--tet-resolution", "24", "--texture-size", "64"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refine")
    obj = write_test_object(root / "objects", "blob")
    orbit = render_orbit(obj, root / "orbit", RenderOrbitConfig(resolution=48, views=21))
    placed = load_trimesh(obj)  # the world frame the orbit was rendered in
    init = root / "init.ply"
    placed.export(init)
    return {"root": root, "orbit": orbit, "init": init, "placed": placed}


def run(*args: str) -> int:
    return main(["refine", *map(str, args), "--device", "cpu"])


def test_refine_writes_a_watertight_textured_mesh(scene, tmp_path: Path):
    out = tmp_path / "out"
    assert run(scene["orbit"], "--init", scene["init"], "-o", out, *TINY) == 0
    for name in ("mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png", "preview.mp4", "refine.json"):
        assert (out / name).is_file(), name
    mesh = load_mesh(out / "mesh.glb", place=False)
    assert mesh.texture is not None and mesh.texture.shape[:2] == (64, 64)
    reloaded = load_trimesh(out / "mesh.obj", place=False)
    welded = trimesh.Trimesh(reloaded.vertices, reloaded.faces, process=True)  # seams merged
    assert welded.is_watertight
    summary = json.loads((out / "refine.json").read_text())
    assert summary["open_edges"] == 0  # what refine.json says of it
    import torch

    from sv3d.refine_stage import _open_edges

    sphere = torch.tensor(trimesh.creation.icosphere(2).faces)
    assert _open_edges(sphere) == 0 and _open_edges(sphere[1:]) == 3  # edges, each once
    assert _open_edges(torch.cat([sphere, sphere[:1].flip(1)])) == 3  # edges of three faces
    import hashlib

    assert summary["init"]["sha256"] == hashlib.sha256(scene["init"].read_bytes()).hexdigest()
    assert summary["init"]["up"] == "auto" and summary["device"] == "cpu"
    assert summary["refine_seconds"] == pytest.approx(sum(s.get("seconds", 0.0) for s in summary["starts"]))
    # Same place and size as the init (the orbit's world frame survives the glTF y-up round trip), but for
    # the floor cut: the hidden bottom is cut flat where every view sees the surface down to (at 48 pixels
    # a view's horizon on the blob is seen about 0.07 above its lowest point).
    expected = scene["placed"].bounds.copy()
    expected[0, 2] = max(expected[0, 2], summary["floor"]["height"])
    assert np.allclose(welded.bounds, expected, atol=0.06)
    assert summary["sds"] is False and summary["history"][-1]["step"] == 12
    # Both starts are on record (the solid blob's open-cavity start fits far worse) and one is chosen.
    starts = summary["starts"]
    assert [s["start"] for s in starts] == ["init", "open cavities"]
    assert sum(s["chosen"] for s in starts) == 1 and np.isfinite(starts[0]["frame_loss"])
    # The floor cut: nothing of the exported mesh lies below the height every view sees it down to.
    floor = summary["floor"]
    assert 0.0 < floor["removed"] < 1.0 and welded.vertices[:, 2].min() >= floor["height"] - 1e-4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--texture-size", "100"], "power of two"),
        (["--sds", "on", "--checkpoint", "/nonexistent/sv3d_p.safetensors"], "checkpoint not found"),
        (["--target-faces", "2"], "--target-faces must be an integer >= 4"),
        (["--tet-resolution", "0"], "--tet-resolution must be in"),
        (["--steps", "0"], "steps must be >= 1"),
    ],
)
def test_bad_options_fail_before_anything_is_written(scene, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert run(scene["orbit"], "--init", scene["init"], "-o", out, *TINY[:6], *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_settings_used_only_at_export_are_checked_up_front():
    """Bake and preview settings failed after the whole refinement (ValueError traceback, no mesh)."""
    from dataclasses import replace

    import torch

    from sv3d.refine_stage import check_refine_stage_config, default_refine_config

    config = default_refine_config(torch.device("cpu"))
    check_refine_stage_config(config)
    b = config.bake
    for bad, message in [
        (replace(config, bake=replace(b, texture_size=4096, supersample=4)), "texture_size x supersample"),
        (replace(config, bake=replace(b, supersample=1.5)), "supersample an integer in [1, 4]"),
        (replace(config, bake=replace(b, chunk_size=0)), "bake.chunk_size must be >= 1"),
        (replace(config, preview_resolution=0), "preview_resolution >= 8"),
        # used in the refinement or its second start only (a traceback, or an error blaming the init)
        (replace(config, refine=replace(config.refine, views_per_step=0)), "views_per_step must be >= 1"),
        (replace(config, refine=replace(config.refine, sds_resolution=100)), "sds_resolution a multiple"),
        (replace(config, cavity_thickness=0.0), "cavity_thickness and cavity_abort_ratio must be > 0"),
        (replace(config, cavity_check=1.5), "cavity_check in [0, 1]"),
        (replace(config, refine=replace(config.refine, lambda_sds=-1.0)), "{'lambda_sds': -1.0}"),
        (replace(config, refine=replace(config.refine, lambda_rgb=math.nan)), "{'lambda_rgb': nan}"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            check_refine_stage_config(bad)


def test_what_refine_would_refuse_late_or_delete_is_refused_first(scene, tmp_path, capsys, monkeypatch):
    """--force into the init's own folder deleted the user's mesh.obj/.mtl/.png (the stage's names); --sds on
    without a checkpoint failed after the signed distances; a fit-nerf folder without fit_nerf.json (an
    interrupted fit: files of two runs) was taken as an init."""
    import shutil

    import sv3d.refine_stage

    monkeypatch.setattr(sv3d.refine_stage, "mesh_sdf", lambda *a, **k: pytest.fail("signed distances ran"))
    folder = tmp_path / "work"
    folder.mkdir()
    scene["placed"].export(folder / "mesh.obj")
    before = (folder / "mesh.obj").read_bytes()
    assert run(scene["orbit"], "--init", folder / "mesh.obj", "-o", folder, "--force", *TINY) == 2
    assert "is the init's folder" in capsys.readouterr().err and (folder / "mesh.obj").read_bytes() == before
    assert run(scene["orbit"], "--init", scene["init"], "-o", scene["orbit"], "--force", *TINY) == 2
    assert "is the orbit directory" in capsys.readouterr().err
    monkeypatch.delenv("SV3D_CHECKPOINT", raising=False)
    assert run(scene["orbit"], "--init", scene["init"], "-o", tmp_path / "o", "--sds", "on", *TINY) == 2
    assert "no SV3D checkpoint" in capsys.readouterr().err and not (tmp_path / "o").exists()
    unfinished = tmp_path / "nerf"
    unfinished.mkdir()
    shutil.copyfile(scene["init"], unfinished / "mesh.ply")  # mesh.ply written, fit_nerf.json not yet
    assert run(scene["orbit"], "--init", unfinished, "-o", tmp_path / "o", *TINY) == 2
    assert "unfinished fit-nerf output" in capsys.readouterr().err


def test_a_vanished_surface_is_one_line(scene, tmp_path, capsys, monkeypatch):
    """The refinement losing every face was a RuntimeError traceback."""
    import sv3d.refine_stage
    from refine.fit import SurfaceVanishedError

    def vanished(*a, **k):
        raise SurfaceVanishedError("step 3: the surface vanished (every SDF value is positive)")

    monkeypatch.setattr(sv3d.refine_stage, "refine_surface", vanished)
    assert run(scene["orbit"], "--init", scene["init"], "-o", tmp_path / "o", *TINY) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line]  # beside the progress bar
    assert len(errors) == 1 and "the surface vanished" in errors[0] and "Traceback" not in err, err


def test_bad_inits_fail_with_one_line(scene, tmp_path, capsys):
    root = scene["root"]
    empty = tmp_path / "empty.ply"
    empty.write_text(
        "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\n"
        "property float z\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n"
    )
    huge = tmp_path / "huge.ply"
    big = scene["placed"].copy()
    big.apply_scale(3.0)  # far larger than the tet grid
    big.export(huge)
    other_orbit = render_orbit(
        write_test_object(tmp_path / "o2", "plate"), tmp_path / "orbit2", RenderOrbitConfig(resolution=32)
    )
    nerf_dir = tmp_path / "nerf"
    nerf_dir.mkdir()
    scene["placed"].export(nerf_dir / "mesh.ply")
    from sv3d.fit_nerf import orbit_fingerprint

    (nerf_dir / "fit_nerf.json").write_text(json.dumps({"orbit_sha256": orbit_fingerprint(other_orbit)}))
    for init, message in [
        (tmp_path / "missing.ply", "not found"),
        (empty, ""),
        (huge, "grid boundary"),
        (nerf_dir, "another orbit"),
        (root / "objects", "not a fit-nerf output"),
    ]:
        out = tmp_path / f"out_{init.name}"
        assert run(scene["orbit"], "--init", init, "-o", out, *TINY) == 2, init
        err = capsys.readouterr().err.strip()
        assert err.startswith("sv3d: error:") and message in err and len(err.splitlines()) == 1, err
        assert not out.exists(), init


def test_an_init_mesh_files_up_axis_can_be_given(scene, tmp_path):
    """`sv3d refine --up y`: a y-up file (x, z, -y of the world) is turned back into the world frame."""
    from sv3d.refine_stage import _load_init

    placed = scene["placed"]
    y_up = placed.copy()
    y_up.vertices = placed.vertices[:, [0, 2, 1]] * [1.0, 1.0, -1.0]
    path = tmp_path / "y_up.obj"
    y_up.export(path)
    mesh, floor = _load_init(path, scene["orbit"], "y")
    assert floor is None and np.allclose(mesh.bounds, placed.bounds, atol=1e-5)
    assert not np.allclose(_load_init(path, scene["orbit"])[0].bounds, placed.bounds, atol=1e-3)


def test_a_nerf_inits_floor_height_is_the_floor_cut(scene, tmp_path, capsys):
    """From a fit-nerf directory the refinement cuts at the floor the NeRF stage recorded (measured on its
    level surface) instead of measuring it again on the coarser tet-grid init; a bad record is refused."""
    from sv3d.fit_nerf import orbit_fingerprint

    nerf_dir = tmp_path / "nerf"
    nerf_dir.mkdir()
    scene["placed"].export(nerf_dir / "mesh.ply")
    floor = float(scene["placed"].bounds[0, 2]) + 0.15  # above where the views see the blob down to
    record = {"orbit_sha256": orbit_fingerprint(scene["orbit"]), "floor_height": floor}
    (nerf_dir / "fit_nerf.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    assert run(scene["orbit"], "--init", nerf_dir, "-o", out, *TINY) == 0
    summary = json.loads((out / "refine.json").read_text())
    assert summary["floor"]["height"] == floor and summary["floor"]["source"] == "given"
    assert summary["floor"]["removed"] > 0
    assert load_trimesh(out / "mesh.obj", place=False).vertices[:, 2].min() >= floor - 1e-4
    # the same init as a mesh file: the floor is measured, lower down (the views see the blob below it)
    assert run(scene["orbit"], "--init", scene["init"], "-o", tmp_path / "m", *TINY) == 0
    measured = json.loads((tmp_path / "m" / "refine.json").read_text())["floor"]
    assert measured["source"] == "measured on the init" and measured["height"] < floor - 0.05
    capsys.readouterr()  # the runs above' progress bars
    for text, message in [
        (json.dumps({**record, "floor_height": "low"}), "floor_height must be a number"),
        (json.dumps({**record, "floor_height": True}), "floor_height must be a number"),
        ("{not json", "unreadable"),
        ("[1, 2]", "expected a JSON object"),
    ]:
        (nerf_dir / "fit_nerf.json").write_text(text)
        assert run(scene["orbit"], "--init", nerf_dir, "-o", tmp_path / "bad", *TINY) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("where", ["export", "preview"])
def test_an_interrupted_refine_leaves_no_files_and_no_folder_it_made(scene, tmp_path, monkeypatch, where):
    """Interrupted as the mesh files are written, or after them (the preview): none of the run's files stay,
    nor the output folder and its parent that it created."""
    import refine.export
    import sv3d.refine_stage

    out = tmp_path / "new" / "out"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "export":
        monkeypatch.setattr(refine.export, "_glb_bytes", boom)
    else:
        monkeypatch.setattr(sv3d.refine_stage, "write_video", boom)
    assert run(scene["orbit"], "--init", scene["init"], "-o", out, *TINY) == 130
    assert not (tmp_path / "new").exists()
    # A folder that was there stays, with what it held; the run's files go
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert run(scene["orbit"], "--init", scene["init"], "-o", out, *TINY, "--force") == 130
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_mesh_sdf_matches_the_analytic_sdf_and_the_full_winding_sign():
    """Signs equal those of the winding number at every point (most are inherited from anchors), distances
    those of a sphere: close to it to the sample spacing, far from it to the sparser sample's."""
    import torch

    from refine.tetgrid import tet_grid
    from sv3d.evaluation.winding import winding_numbers
    from sv3d.refine_stage import mesh_sdf

    torus = trimesh.creation.torus(0.3, 0.1, major_sections=48, minor_sections=24)  # a hole: sign matters
    points = tet_grid(32).vertices  # [N, 3]
    sdf = mesh_sdf(torus, points)
    winding = winding_numbers(points.double(), torch.as_tensor(torus.vertices), torch.as_tensor(torus.faces))
    assert torch.equal(sdf < 0, winding > 0.5)
    sphere = trimesh.creation.icosphere(5, radius=0.3)
    sdf = mesh_sdf(sphere, points).numpy()
    truth = np.linalg.norm(points.numpy(), axis=1) - 0.3
    assert np.array_equal(sdf < 0, truth < 0)
    near = np.abs(truth) < 0.03
    assert np.abs(sdf - truth)[near].max() < 0.004  # 300 k samples on the sphere: spacing ~0.001
    assert np.abs(sdf - truth)[~near].max() < 0.015  # 20 k samples: spacing ~0.004; faceting ~0.0005
    assert mesh_sdf(trimesh.Trimesh(), points).min() > 0  # nothing inside
    inward = trimesh.Trimesh(sphere.vertices, sphere.faces[:, ::-1], process=False)  # winding -1 inside
    assert torch.equal(mesh_sdf(inward, points) < 0, torch.as_tensor(truth < 0))
    assert torch.equal(mesh_sdf(sphere, points), mesh_sdf(sphere, points))  # seeded samples: same SDF again


@pytest.mark.parametrize(
    "device, bf16, dtype", [("cuda", True, "bfloat16"), ("cuda", False, "float16"), ("cpu", True, "float32")]
)
def test_the_sds_model_loads_in_the_devices_precision(tmp_path, monkeypatch, device, bf16, dtype):
    """bfloat16 UNet and CLIP on CUDA as in the orbit stage (the VAE stays float32 inside the loader);
    float16 on GPUs without bfloat16 (V100, T4); and the noise annealing spans the real SDS phase."""
    import dataclasses

    import torch

    import sv3d.refine_stage as refine_stage
    from sv3d.model.pipeline import SV3DPipeline

    class Loaded(Exception):
        pass

    seen = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(SV3DPipeline, "load", staticmethod(fake_load))
    # is_bf16_supported() says yes on a V100 or T4 too (emulation): the capability decides
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda *args, **kwargs: (8, 0) if bf16 else (7, 5)
    )
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read")
    config = refine_stage.default_refine_config(torch.device("cpu"))
    config = dataclasses.replace(config, sds="on", checkpoint=str(checkpoint))
    frames = types.SimpleNamespace(orbit=static_orbit(), alpha_source="matting")  # SV3D's own cameras
    plan = refine_stage._guidance_plan(frames, config, torch.device(device))
    with pytest.raises(Loaded):
        refine_stage._guidance(frames, config, torch.device(device), plan)
    assert seen["dtype"] == getattr(torch, dtype) and seen["device"] == torch.device(device)
    if device != "cpu":
        return
    # SDS acts in the last sds_fraction of the steps: its sigma bound anneals over those calls (1000 before,
    # so it never got near its final value)
    import sv3d.guidance as guidance

    made = {}
    monkeypatch.setattr(SV3DPipeline, "load", staticmethod(lambda path, **kwargs: None))
    monkeypatch.setattr(
        guidance, "make_sv3d_guidance", lambda pipeline, image, orbit, sds: made.update(sds=sds)
    )
    config.refine.steps, config.refine.sds_fraction = 300, 0.2
    frames.images = torch.ones(21, 8, 8, 4)
    refine_stage._guidance(
        frames,
        config,
        torch.device(device),
        refine_stage._guidance_plan(frames, config, torch.device(device)),
    )
    assert made["sds"].anneal_steps == 60 and made["sds"].seed == config.refine.seed


def test_sds_is_not_used_on_cameras_sv3d_does_not_know(tmp_path, monkeypatch, capsys):
    import dataclasses

    import torch

    import sv3d.refine_stage as refine_stage
    from sv3d.model.pipeline import SV3DPipeline

    monkeypatch.setattr(SV3DPipeline, "load", staticmethod(lambda *a, **k: pytest.fail("loaded")))
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read")
    config = refine_stage.default_refine_config(torch.device("cpu"))
    wide = types.SimpleNamespace(orbit=static_orbit(), alpha_source="matting")
    wide.orbit.fov_deg = 50.0  # another tool's lens
    auto = dataclasses.replace(config, sds="auto", checkpoint=str(checkpoint))
    assert (
        refine_stage._guidance_plan(wide, auto, torch.device("cuda")) is None
    )  # on there by default: skipped
    assert "no SDS" in capsys.readouterr().err
    # ground-truth renders (an oracle orbit) are not pulled towards the model's guess unless asked
    truth = types.SimpleNamespace(orbit=static_orbit(), alpha_source="render")
    assert refine_stage._guidance_plan(truth, auto, torch.device("cuda")) is None
    assert "ground-truth renders" in capsys.readouterr().err
    assert not refine_stage.sds_wanted(auto, torch.device("cuda"), rendered=True)
    assert refine_stage.sds_wanted(auto, torch.device("cuda")) and not refine_stage.sds_wanted(
        auto, torch.device("cpu")
    )
    assert refine_stage.sds_wanted(dataclasses.replace(auto, sds="on"), torch.device("cpu"), rendered=True)
    with pytest.raises(InputError, match="field of view 50.0"):
        refine_stage._guidance_plan(wide, dataclasses.replace(auto, sds="on"), torch.device("cpu"))
    on = dataclasses.replace(auto, sds="on")
    far, few = static_orbit(), static_orbit(num_frames=5)
    far.radius = 3.0
    rolled = static_orbit()
    rolled.c2w_matrices = rolled.c2w().to(torch.float64)
    for orbit, fragment in ((far, "camera distance 3.00"), (few, "5 frames"), (rolled, "look-at")):
        with pytest.raises(InputError, match=fragment):
            refine_stage._guidance_plan(
                types.SimpleNamespace(orbit=orbit, alpha_source="matting"), on, torch.device("cpu")
            )


def test_score_glb_reports_the_exported_textures_psnr(scene, tmp_path):
    """`scripts/score_glb.py` (the README's `.glb` PSNR column) on an sv3d-eval-like folder."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location(
        "score_glb", Path(__file__).parents[1] / "scripts/score_glb.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    obj = tmp_path / "eval" / "blob"
    assert run(scene["orbit"], "--init", scene["init"], "-o", obj, *TINY) == 0
    shutil.copytree(scene["orbit"], obj / "gt_orbit")
    assert script.main([str(tmp_path / "eval"), "--size", "48", "--json", str(tmp_path / "s.json")]) == 0
    score = json.loads((tmp_path / "s.json").read_text())["blob"]
    assert 15.0 < score < 60.0, score  # 12 toy steps: a rough texture, but the object's
    assert script.main([str(tmp_path)]) == 2  # no eval folder there
    # larger than the frames: compared at the frames' size (a shape error before); a broken mesh beside
    # it is reported and the other objects are still scored (one failure lost every score)
    broken = tmp_path / "eval" / "broken"
    shutil.copytree(scene["orbit"], broken / "gt_orbit")
    (broken / "mesh.glb").write_bytes(b"not a glb")
    assert script.main([str(tmp_path / "eval"), "--size", "4096", "--json", str(tmp_path / "s.json")]) == 1
    scores = json.loads((tmp_path / "s.json").read_text())
    assert isinstance(scores["blob"], float) and scores["broken"].startswith("error: ")


def test_sv3d_checkpoint_in_the_environment_counts_as_given(monkeypatch, tmp_path: Path):
    """`sv3d refine` read $SV3D_CHECKPOINT only with --sds on, so `auto` on CUDA ran without SDS where
    `sv3d run` and the Hydra configs guided with it."""
    import sv3d.refine_stage

    seen = []
    monkeypatch.setattr(sv3d.refine_stage, "refine_stage", lambda *a, **k: seen.append(a[3]) or a[2])
    monkeypatch.setenv("SV3D_CHECKPOINT", str(tmp_path / "sv3d_p.safetensors"))
    assert run(tmp_path / "orbit", "--init", tmp_path / "mesh.ply", "-o", tmp_path / "out") == 0
    assert seen[0].checkpoint == str(tmp_path / "sv3d_p.safetensors") and seen[0].sds == "auto"
    seen.clear()
    out = tmp_path / "o2"
    assert run(tmp_path / "orbit", "--init", tmp_path / "mesh.ply", "-o", out, "--checkpoint", "x") == 0
    assert seen[0].checkpoint == "x"  # the option wins

"""`sv3d eval` (sv3d/evaluate.py): per-object metrics, summaries, resume after interruption, bad input.

Most tests replace the 3D pipeline (`sv3d.run.run_from_orbit` / `run_image_to_mesh`) with a fake that
"reconstructs" the ground truth exactly (so the final metrics are known by hand: Chamfer ~0, IoU ~1), and
a ball as its NeRF mesh; the renders, the visual hull, the protocol and the summaries are the real ones at
toy sizes. One slow test runs the real pipeline (preset=toy) through an interruption.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import sv3d.evaluation.metrics
import sv3d.orbit
import sv3d.run
from sv3d.cameras import make_orbit, write_orbit_directory
from sv3d.cli import main
from sv3d.config import compose_config, eval_config, run_config
from sv3d.errors import InputError
from sv3d.evaluate import EvalConfig, aggregate_sweep, evaluate_dataset, summarize
from sv3d.meshio import load_trimesh
from sv3d.render_orbit import RenderOrbitConfig, render_orbit_frames
from sv3d.testing.objects import write_test_objects

OBJECTS = ("plate", "blob")
REAL_OCCUPANCY = sv3d.evaluation.metrics.occupancy  # before the fixture below replaces it


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gso")
    write_test_objects(root, OBJECTS)
    return root


@pytest.fixture(scope="module")
def toy():
    cfg = compose_config(["preset=toy"])
    return eval_config(cfg), run_config(cfg)


class FakePipeline:
    """Stands in for run_from_orbit / run_image_to_mesh: mesh.ply = the ground truth placed in the world,
    nerf/mesh.ply = a ball of radius 0.3; in generated mode it also writes orbit/ (the GT renders)."""

    def __init__(
        self, dataset: Path, flag: tuple[str, ...] = (), fail: tuple[str, ...] = (), stop=(), turn=0.0
    ):
        self.dataset, self.flag, self.fail, self.stop = dataset, flag, fail, stop
        self.turn = turn  # generated mode: the input view's azimuth, which a generator calls 0
        self.calls: list[str] = []
        self.forces: list[bool] = []  # each call's force: False resumes a real pipeline's finished stages

    def __call__(self, source, output_dir, config=None, force=False, progress=True):
        out = Path(output_dir)
        name = out.name
        self.calls.append(name)
        self.forces.append(force)
        if name in self.stop:
            raise KeyboardInterrupt
        if name in self.fail:
            raise InputError(f"fake failure of {name}")
        mesh_path = self.dataset / name / "meshes" / "model.obj"
        (out / "nerf").mkdir(parents=True, exist_ok=True)
        turn = trimesh.transformations.rotation_matrix(math.radians(-self.turn), [0.0, 0.0, 1.0])
        if force or not (out / "mesh.ply").is_file():  # resumed unforced, as run.py: finished files kept
            load_trimesh(mesh_path).apply_transform(turn).export(out / "mesh.ply")  # a perfect generator's
        trimesh.creation.icosphere(subdivisions=3, radius=0.3).export(out / "nerf" / "mesh.ply")
        if Path(source).suffix == ".png":  # generated mode: the "generated" orbit is the GT's, input at 0
            frames = render_orbit_frames(
                mesh_path, RenderOrbitConfig(resolution=32, input_azimuth_deg=self.turn)
            )
            write_orbit_directory(
                out / "orbit", make_orbit("static"), frames.images, "render", overwrite=True
            )
        summary = {"stages": {"nerf": {"seconds": 0.0}}, "consistency": {"masked_psnr_db": 25.0}}
        (out / "run.json").write_text(json.dumps(summary))
        return sv3d.run.RunResult(out, out / "mesh.ply", summary, name in self.flag)


def _fake(monkeypatch, dataset: Path, **kwargs) -> FakePipeline:
    fake = FakePipeline(dataset, **kwargs)
    monkeypatch.setattr(sv3d.run, "run_from_orbit", fake)
    monkeypatch.setattr(sv3d.run, "run_image_to_mesh", fake)
    return fake


def test_cli_eval_writes_metrics_and_summaries(dataset, tmp_path, monkeypatch):
    fake = _fake(monkeypatch, dataset, flag=("blob",))
    out = tmp_path / "eval"
    assert main(["eval", str(dataset), "-o", str(out), "--preset", "toy"]) == 0
    assert fake.calls == ["blob", "plate"]  # sorted object names

    for name in OBJECTS:
        record = json.loads((out / name / "metrics.json").read_text())
        assert (out / name / "gt_orbit" / "transforms.json").is_file()  # oracle: the GT orbit fed the run
        assert record["status"] == "ok" and record["mode"] == "oracle"
        # the fake reconstructs the ground truth itself: the same visible samples up to round-off
        assert record["final"]["chamfer"] < 1e-3
        assert record["final"]["fscore@0.01"] > 0.99
        # the ground truth itself: IoU 1, the plate (2.3% thick) too, with 16 of the toy 16³ grid's cells
        # across its thickness (in cubes of its width it held no cell centre: IoU 0)
        assert record["final"]["volume_iou"] == 1.0
        # a 32³ hull from 32-px masks and a ball are both worse than that
        assert record["hull"]["chamfer"] > record["final"]["chamfer"]
        assert record["nerf"]["chamfer"] > record["final"]["chamfer"]
        assert record["flagged"] == (name == "blob")  # a flagged object is scored anyway
        assert {"render_seconds", "pipeline_seconds", "hull_seconds"} <= set(record["timings"])

    s = json.loads((out / "summary.json").read_text())
    assert (s["n_objects"], s["n_ok"], s["n_failed"], s["n_flagged"]) == (2, 2, 0, 1)
    assert s["metrics"] == ["chamfer", "volume_iou", "fscore@0.01", "fscore@0.02", "fscore@0.05"]
    rows = {r["object"]: r for r in s["objects"]}
    for source in ("final", "nerf", "hull"):
        a, b = rows["blob"][source]["chamfer"], rows["plate"][source]["chamfer"]
        assert s["aggregate"]["mean"][source]["chamfer"] == pytest.approx((a + b) / 2)
        assert s["aggregate"]["median"][source]["chamfer"] == pytest.approx((a + b) / 2)  # two values

    table = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["object"] for r in table] == ["blob", "plate", "mean", "median"]
    assert float(table[0]["chamfer_hull"]) == pytest.approx(rows["blob"]["hull"]["chamfer"])
    assert table[0]["flagged"] == "1" and table[1]["flagged"] == "0"
    md = (out / "summary.md").read_text()
    assert "| chamfer | chamfer_nerf | chamfer_hull |" in md and md.count("\n| ") == 5  # header + 4 rows
    with Image.open(out / "summary.png") as im:
        assert im.mode == "RGB" and im.width >= 360 and im.height > 200


def test_rerun_skips_finished_objects_and_resumes_after_interrupt(dataset, tmp_path, monkeypatch, toy):
    config, run = toy
    straight = evaluate_dataset(dataset, tmp_path / "a", config, run, progress=False)

    fake = _fake(monkeypatch, dataset, stop=("plate",))  # killed while on the second object
    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(dataset, tmp_path / "b", config, run, progress=False)
    assert (tmp_path / "b/blob/metrics.json").is_file() and not (tmp_path / "b/summary.json").exists()

    fake = _fake(monkeypatch, dataset)
    resumed = evaluate_dataset(dataset, tmp_path / "b", config, run, progress=False)
    assert fake.calls == ["plate"]  # blob was not recomputed
    assert resumed.summary == straight.summary
    assert (tmp_path / "b/summary.json").read_bytes() == (tmp_path / "a/summary.json").read_bytes()

    evaluate_dataset(dataset, tmp_path / "b", config, run, progress=False)
    assert fake.calls == ["plate"]  # a third run recomputes nothing


@pytest.fixture(autouse=True)
def _default_fake(monkeypatch, dataset):
    """Every test runs with the fake pipeline unless it installs its own (the slow test undoes this), and
    with ray-parity inside/outside for the volume IoU: the same answer as the winding numbers on these
    closed meshes, in milliseconds instead of ~10 s a mesh on a loaded 2-core machine."""
    import sv3d.evaluation.metrics as metrics

    _fake(monkeypatch, dataset)
    monkeypatch.setattr(metrics, "occupancy", lambda mesh, points, device="auto": mesh.contains(points))


def test_cli_eval_exits_1_when_an_object_failed_and_names_it(dataset, tmp_path, monkeypatch, capsys):
    _fake(monkeypatch, dataset, fail=("blob",))
    out = tmp_path / "eval"
    assert main(["eval", str(dataset), "-o", str(out), "--preset", "toy"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"sv3d eval: 1 object(s) failed: blob (each: {out}/<object>/error.txt)", err
    assert (out / "summary.json").is_file() and (out / "blob" / "error.txt").is_file()
    _fake(monkeypatch, dataset)  # fixed: the rerun retries blob and ends well
    assert main(["eval", str(dataset), "-o", str(out), "--preset", "toy"]) == 0


def test_a_ground_truth_without_volume_fails_before_the_pipeline(tmp_path, monkeypatch, toy):
    """A double-sided model (every triangle twice, both windings: they cancel) scored volume IoU 0.0 for
    the final mesh, the NeRF mesh and the hull alike, read as total misses: now the object fails, named,
    before its renders and pipeline."""
    import sv3d.evaluation.metrics as metrics

    monkeypatch.setattr(metrics, "occupancy", REAL_OCCUPANCY)  # ray parity calls the two sheets solid
    config, run = toy
    box = trimesh.creation.box()
    meshes = tmp_path / "gso" / "card" / "meshes"
    meshes.mkdir(parents=True)
    faces = np.concatenate([box.faces, box.faces[:, ::-1]])
    trimesh.Trimesh(box.vertices, faces, process=False).export(meshes / "model.obj")
    fake = _fake(monkeypatch, tmp_path / "gso")
    result = evaluate_dataset(tmp_path / "gso", tmp_path / "out", config, run, progress=False)
    assert fake.calls == [] and not (tmp_path / "out" / "card" / "gt_orbit").exists()
    assert "encloses no volume" in result.records[0]["error"]


def test_generated_mode_refuses_an_input_view_at_another_elevation_than_the_orbit_takes(
    dataset, tmp_path, toy
):
    """Through the Python API the two could differ (Hydra and the CLI set both from sv3d.elevation_deg):
    the generated world came out tilted against the ground truth and was scored so, without a word."""
    config, run = toy
    config = replace(config, mode="generated", render=replace(config.render, elevation_deg=25.0))
    with pytest.raises(InputError, match="elevation 25.0 but the orbit stage takes it as 10.0"):
        evaluate_dataset(dataset, tmp_path / "out", config, run, objects=["blob"])
    assert not (tmp_path / "out").exists()


def test_an_out_of_memory_object_names_the_evals_offload_setting(dataset, tmp_path, monkeypatch, toy):
    """The run's hint says --offload, which sv3d eval spells --set sv3d.offload=true (it then resumes)."""
    from sv3d.errors import OUT_OF_MEMORY_HINT

    def out_of_memory(*args, **kwargs):
        raise sv3d.run.RunOutOfMemoryError(f"stage refine: {OUT_OF_MEMORY_HINT}")

    monkeypatch.setattr(sv3d.run, "run_from_orbit", out_of_memory)
    config, run = toy
    result = evaluate_dataset(dataset, tmp_path, config, run, objects=["blob"], progress=False)
    assert "out of memory: try --set sv3d.offload=true for SV3D sampling" in result.records[0]["error"]


def test_failing_object_is_recorded_and_the_batch_goes_on(dataset, tmp_path, monkeypatch, toy):
    config, run = toy
    _fake(monkeypatch, dataset, fail=("blob",))
    result = evaluate_dataset(dataset, tmp_path, config, run, progress=False)
    rows = {r["object"]: r for r in result.summary["objects"]}
    assert rows["blob"] == {
        "object": "blob",
        "status": "error",
        "flagged": False,
        "error": "InputError: fake failure of blob",
    }
    assert rows["plate"]["status"] == "ok" and result.summary["n_failed"] == 1
    assert "fake failure of blob" in (tmp_path / "blob/error.txt").read_text()
    assert result.summary["aggregate"]["mean"]["final"]["chamfer"] == rows["plate"]["final"]["chamfer"]
    assert "InputError: fake failure of blob" in (tmp_path / "summary.md").read_text()

    fake = _fake(monkeypatch, dataset)  # the cause is fixed: a rerun retries only the failed object
    result = evaluate_dataset(dataset, tmp_path, config, run, progress=False)
    assert fake.calls == ["blob"] and result.summary["n_failed"] == 0
    assert not (tmp_path / "blob/error.txt").exists()


def test_a_baseline_that_cannot_be_scored_keeps_the_objects_figures(dataset, tmp_path, monkeypatch, toy):
    """An unreadable NeRF mesh (or masks that carve no hull) lost the object's final figures as well: the
    whole object was an error and left every mean. Now only that source is blank, with its reason."""
    config, run = toy
    fake = _fake(monkeypatch, dataset)

    def broken_nerf_mesh(source, output_dir, *a, **k):
        result = fake(source, output_dir, *a, **k)
        if Path(output_dir).name == "blob":
            (Path(output_dir) / "nerf" / "mesh.ply").write_text("not a mesh")
        return result

    monkeypatch.setattr(sv3d.run, "run_from_orbit", broken_nerf_mesh)
    result = evaluate_dataset(dataset, tmp_path, config, run, progress=False)
    rows = {r["object"]: r for r in result.summary["objects"]}
    blob = rows["blob"]
    assert blob["status"] == "ok" and result.summary["n_failed"] == 0
    assert blob["final"]["chamfer"] < 0.01 and blob["hull"]["chamfer"] > 0
    assert blob["nerf"]["chamfer"] is None and blob["error"].startswith("NeRF mesh: MeshLoadError")
    mean = result.summary["aggregate"]["mean"]
    assert mean["nerf"]["chamfer"] == rows["plate"]["nerf"]["chamfer"]  # over the objects that have one
    assert "NeRF mesh: MeshLoadError" in (tmp_path / "summary.md").read_text()


def test_other_config_is_refused_unless_force(dataset, tmp_path, monkeypatch, toy):
    config, run = toy
    evaluate_dataset(dataset, tmp_path, config, run, objects=["plate"], progress=False)
    other = EvalConfig(**{**config.__dict__, "n_points": 1000})
    with pytest.raises(InputError, match="another config"):
        evaluate_dataset(dataset, tmp_path, other, run, objects=["plate"], progress=False)
    fake = _fake(monkeypatch, dataset)
    result = evaluate_dataset(dataset, tmp_path, other, run, objects=["plate"], force=True, progress=False)
    assert fake.calls == ["plate"] and result.records[0]["final"]  # recomputed with the new config
    assert json.loads((tmp_path / "plate/metrics.json").read_text())["fingerprint"] != ""


def test_memory_only_settings_resume_the_batch(dataset, tmp_path, monkeypatch, toy):
    """Following the out-of-memory hint (--offload, fewer views per batch), or naming the device that auto
    picks, resumes a batch (it was "another config"): also one started before 2026-12-08, whose records
    hashed those settings as given and whose render.json held them (the frames are not rendered again).
    A setting that changes the figures is still another config."""
    from dataclasses import asdict

    from sv3d.device import pick_device
    from sv3d.evaluate import config_fingerprint

    config, run = toy
    _fake(monkeypatch, dataset, stop=("plate",))
    with pytest.raises(KeyboardInterrupt):  # blob finished, plate rendered and started
        evaluate_dataset(dataset, tmp_path, config, run, progress=False)
    legacy = config_fingerprint(config, run, scheme=1)  # as recorded until 2026-12-08
    _as_older_protocol(tmp_path / "blob", legacy)
    _as_older_protocol(tmp_path / "plate", legacy)
    (tmp_path / "plate" / "render.json").write_text(
        json.dumps({"mode": "oracle", "render": asdict(config.render)})
    )

    lean_run = copy.deepcopy(run)
    lean_run.orbit.offload = True  # (oracle mode leaves the orbit stage's settings out anyway)
    if pick_device("auto") == pick_device(run.device):  # naming the device auto picks, or auto for it
        lean_run.device = "auto" if run.device != "auto" else pick_device("auto").type
    lean = replace(config, render=replace(config.render, views_per_batch=1))
    assert config_fingerprint(lean, lean_run) == config_fingerprint(config, run)
    renderer = sys.modules["sv3d.render_orbit"]  # the package's `render_orbit` is the function
    monkeypatch.setattr(renderer, "render_orbit", lambda *a, **k: pytest.fail("rendered again"))
    fake = _fake(monkeypatch, dataset)
    evaluate_dataset(dataset, tmp_path, lean, lean_run, progress=False)
    assert fake.calls == ["plate"]  # blob kept, plate resumed
    steps = copy.deepcopy(lean_run)
    steps.nerf.train.steps += 1
    assert config_fingerprint(lean, steps) != config_fingerprint(lean, lean_run)
    with pytest.raises(InputError, match="another config"):
        evaluate_dataset(dataset, tmp_path, lean, steps, progress=False)


def test_an_oracle_fingerprint_holds_what_the_sds_model_takes_from_the_orbit_settings(toy):
    """Oracle mode leaves the orbit stage's settings out, but the SDS guidance takes its dtype and sgm
    yaml from them (run.py): another dtype is another config; the checkpoint's path is not (its bytes are
    hashed where SDS runs)."""
    from sv3d.evaluate import config_fingerprint

    config, run = toy
    with_model = copy.deepcopy(run)
    with_model.orbit.checkpoint, with_model.orbit.dtype = "/models/sv3d_p.safetensors", "bfloat16"
    other_dtype = copy.deepcopy(with_model)
    other_dtype.orbit.dtype = "float16"
    moved = copy.deepcopy(with_model)
    moved.orbit.checkpoint = "/elsewhere/sv3d_p.safetensors"
    assert config_fingerprint(config, other_dtype) != config_fingerprint(config, with_model)
    assert config_fingerprint(config, moved) == config_fingerprint(config, with_model)


def test_ground_truth_frames_do_not_depend_on_views_per_batch(dataset):
    """views_per_batch is left out of the evaluation's fingerprint: the frames differ with it only by float
    round-off (batched matrix products; 6.1e-5 at most measured at 576², the mug and the plate)."""
    mesh = dataset / "plate" / "meshes" / "model.obj"
    one, all_at_once = (
        render_orbit_frames(mesh, RenderOrbitConfig(views=5, resolution=32, views_per_batch=n))
        for n in (1, 5)
    )
    assert (one.images - all_at_once.images).abs().max() < 1e-4


def _as_older_protocol(object_dir: Path, fingerprint: str, **final) -> None:
    """Rewrite an object's records as an evaluation under an older protocol left them (its fingerprint;
    `final`: figures it had scored differently)."""
    for file in ("metrics.json", "started.json"):
        if (object_dir / file).is_file():
            record = json.loads((object_dir / file).read_text())
            record["fingerprint"] = fingerprint
            if file == "metrics.json":
                record["final"].update(final)
                record["timings"]["pipeline_seconds"] = 123.0
            (object_dir / file).write_text(json.dumps(record))


def test_an_older_scoring_protocol_is_refused_unless_rescore(dataset, tmp_path, monkeypatch, toy):
    """Records of this config scored under an older protocol: a plain rerun refuses them and names
    --rescore; --rescore scores them again, unforced (the pipeline resumes its finished stages: the mesh
    file is the same), keeps their pipeline time and records where they came from; a second --rescore
    keeps what is current (a killed one resumes); --rescore with --force is refused."""
    from sv3d.evaluate import PROTOCOL_VERSION, config_fingerprint

    config, run = toy
    evaluate_dataset(dataset, tmp_path, config, run, progress=False)
    old = config_fingerprint(config, run, None, PROTOCOL_VERSION - 1)
    for name in OBJECTS:
        _as_older_protocol(tmp_path / name, old, volume_iou=-1.0)
    meshes = {name: (tmp_path / name / "mesh.ply").read_bytes() for name in OBJECTS}
    fake = _fake(monkeypatch, dataset)
    with pytest.raises(InputError, match="older scoring protocol .*--rescore scores them again"):
        evaluate_dataset(dataset, tmp_path, config, run, progress=False)
    with pytest.raises(InputError, match="--rescore keeps it"):
        evaluate_dataset(dataset, tmp_path, config, run, progress=False, rescore=True, force=True)
    assert fake.calls == []  # every refusal came before any object ran

    result = evaluate_dataset(dataset, tmp_path, config, run, progress=False, rescore=True)
    assert sorted(fake.calls) == sorted(OBJECTS) and fake.forces == [False, False]
    for name in OBJECTS:
        record = json.loads((tmp_path / name / "metrics.json").read_text())
        assert record["fingerprint"] == config_fingerprint(config, run) and record["rescored_from"] == old
        assert record["final"]["volume_iou"] == 1.0 and record["timings"]["pipeline_seconds"] == 123.0
        assert (tmp_path / name / "mesh.ply").read_bytes() == meshes[name]
    assert result.summary["n_ok"] == 2
    evaluate_dataset(dataset, tmp_path, config, run, progress=False, rescore=True)  # all current: kept
    evaluate_dataset(dataset, tmp_path, config, run, progress=False)
    assert len(fake.calls) == 2


def test_rescore_is_not_offered_when_another_config_is_among_the_refused(dataset, tmp_path, monkeypatch, toy):
    """One object under an older protocol, one under another config: the refusal names the one that
    --rescore would not mend; an unfinished object under an older protocol runs as in any rerun."""
    from sv3d.evaluate import PROTOCOL_VERSION, config_fingerprint

    config, run = toy
    evaluate_dataset(dataset, tmp_path, config, run, progress=False)
    _as_older_protocol(tmp_path / "blob", config_fingerprint(config, run, None, PROTOCOL_VERSION - 1))
    _as_older_protocol(tmp_path / "plate", "another config's fingerprint")
    with pytest.raises(
        InputError, match="plate: was evaluated with another config.*2 object.*--force"
    ) as err:
        evaluate_dataset(dataset, tmp_path, config, run, progress=False)
    assert "--rescore" not in str(err.value)
    with pytest.raises(InputError, match="plate: was evaluated with another config.*1 object"):
        evaluate_dataset(dataset, tmp_path, config, run, progress=False, rescore=True)
    (tmp_path / "plate" / "metrics.json").unlink()
    _as_older_protocol(tmp_path / "plate", config_fingerprint(config, run, None, PROTOCOL_VERSION - 1))
    fake = _fake(monkeypatch, dataset)
    evaluate_dataset(dataset, tmp_path, config, run, progress=False, rescore=True)
    plate = json.loads((tmp_path / "plate" / "metrics.json").read_text())
    assert sorted(fake.calls) == ["blob", "plate"] and "rescored_from" not in plate  # started, not finished


def test_half_done_object_of_another_config_is_refused_up_front(dataset, tmp_path, monkeypatch, toy):
    config, run = toy
    _fake(monkeypatch, dataset, stop=("plate",))  # interrupted inside plate's pipeline
    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(dataset, tmp_path, config, run, objects=["plate"], progress=False)
    assert not (tmp_path / "plate/metrics.json").exists()
    other = EvalConfig(**{**config.__dict__, "n_points": 1000})
    fake = _fake(monkeypatch, dataset)
    with pytest.raises(InputError, match="another config"):  # before any object is run or re-rendered
        evaluate_dataset(dataset, tmp_path, other, run, objects=["blob", "plate"], progress=False)
    assert fake.calls == [] and not (tmp_path / "blob").exists()
    result = evaluate_dataset(dataset, tmp_path, config, run, objects=["plate"], progress=False)
    assert fake.calls == ["plate"] and result.summary["n_failed"] == 0  # the same config resumes it
    result = evaluate_dataset(dataset, tmp_path, other, run, objects=["plate"], force=True, progress=False)
    assert fake.calls == ["plate", "plate"] and result.summary["n_failed"] == 0


def test_another_datasets_object_of_the_same_name_is_refused(dataset, tmp_path, monkeypatch, toy):
    config, run = toy
    evaluate_dataset(dataset, tmp_path / "out", config, run, objects=["plate"], progress=False)
    other = tmp_path / "other"
    shutil.copytree(dataset / "plate", other / "plate")
    obj = other / "plate" / "meshes" / "model.obj"
    obj.write_text(obj.read_text() + "\n")  # any change to the ground truth's files
    fake = _fake(monkeypatch, dataset)
    with pytest.raises(InputError, match="another ground truth"):
        evaluate_dataset(other, tmp_path / "out", config, run, objects=["plate"], progress=False)
    assert fake.calls == []
    evaluate_dataset(dataset, tmp_path / "out", config, run, objects=["plate"], progress=False)
    assert fake.calls == []  # the same dataset: finished, kept
    mesh = dataset / "plate" / "meshes" / "model.obj"
    os.utime(mesh, ns=(mesh.stat().st_atime_ns, mesh.stat().st_mtime_ns + 10**9))  # touched: hashed again
    evaluate_dataset(dataset, tmp_path / "out", config, run, objects=["plate"], progress=False)
    assert fake.calls == []  # same content: still finished


def test_generated_mode_renders_the_input_view(dataset, tmp_path, monkeypatch, toy):
    config, run = toy
    config, run = EvalConfig(**{**config.__dict__, "mode": "generated"}), copy.deepcopy(run)
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read by the fake pipeline")
    run.orbit.checkpoint = str(checkpoint)
    fake = _fake(monkeypatch, dataset)
    # nor checked: the fake ignores it
    monkeypatch.setattr(sv3d.orbit, "check_checkpoint", lambda path, orbit=None: None)
    result = evaluate_dataset(dataset, tmp_path / "out", config, run, objects=["blob"], progress=False)
    assert fake.calls == ["blob"] and result.summary["mode"] == "generated"
    # input.png is the orbit's last frame: elevation 10, azimuth 0, at the configured size, RGBA
    with Image.open(tmp_path / "out/blob/input.png") as im:
        image = np.asarray(im)
    assert image.shape == (32, 32, 4)
    mesh = dataset / "blob" / "meshes" / "model.obj"
    last = render_orbit_frames(mesh, RenderOrbitConfig(resolution=32)).images[-1]  # [H, W, 4]
    assert np.abs(image / 255.0 - last.numpy()).max() < 1.0 / 255 + 1e-6
    # generated mode renormalises the prediction; the hull comes from the generated orbit's masks
    record = result.records[0]
    assert record["final"]["chamfer"] < 1e-3 and record["hull"]["chamfer"] > record["final"]["chamfer"]

    # the same path with other weights: the finished object was kept with the old model's figures
    evaluate_dataset(dataset, tmp_path / "out", config, run, objects=["blob"], progress=False)
    assert fake.calls == ["blob"]  # unchanged file: kept (its hash is reused from checkpoints.json)
    checkpoint.write_bytes(b"other weights at the same path")
    with pytest.raises(InputError, match="another config, scoring protocol or checkpoint"):
        evaluate_dataset(dataset, tmp_path / "out", config, run, objects=["blob"], progress=False)


def test_generated_mode_turns_the_prediction_back_by_the_input_azimuth(dataset, tmp_path, monkeypatch, toy):
    config, run = toy
    render = replace(config.render, input_azimuth_deg=90.0)
    config = EvalConfig(**{**config.__dict__, "mode": "generated", "render": render})
    run = copy.deepcopy(run)
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read by the fake pipeline")
    run.orbit.checkpoint = str(checkpoint)
    _fake(monkeypatch, dataset, turn=90.0)  # writes what a perfect generator would: the GT turned by -90
    monkeypatch.setattr(sv3d.orbit, "check_checkpoint", lambda path, orbit=None: None)
    result = evaluate_dataset(dataset, tmp_path / "out", config, run, objects=["blob"], progress=False)
    # that is the generator's world: its input view (azimuth 0) shows what input.png (azimuth 90) shows
    with Image.open(tmp_path / "out/blob/input.png") as im:
        alpha = np.asarray(im)[..., 3] / 255.0  # [H, W]
    one_view = RenderOrbitConfig(resolution=32, views=1, up="z")
    seen = render_orbit_frames(tmp_path / "out/blob/mesh.ply", one_view).images[0, ..., 3].numpy()
    gt_view = replace(one_view, up="auto")  # as the evaluation loads the ground truth
    unturned = render_orbit_frames(dataset / "blob/meshes/model.obj", gt_view).images[0, ..., 3].numpy()
    assert np.abs(alpha - seen).mean() < 0.01 < np.abs(alpha - unturned).mean()  # blob is not round
    record = result.records[0]
    # not turned back: 0.046 and 0.042 (measured); turned: 0 and the coarse 32-px hull's 0.022
    assert record["final"]["chamfer"] < 1e-3 and record["hull"]["chamfer"] < 0.03


@pytest.mark.parametrize(
    "case",
    [
        "missing dataset",
        "dataset is a file",
        "empty dataset",
        "unknown object",
        "missing list",
        "bad mode",
        "bad texture size",
        "corrupt checkpoint",
        "force and rescore",  # also through Hydra's eval.rescore, which the command honours
    ],
)
def test_bad_input_is_one_line_and_exit_2_creating_nothing(dataset, tmp_path, capsys, case):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "list.txt").write_text("blob\n# a comment\nteapot\n")
    args = {
        "missing dataset": [str(tmp_path / "nowhere")],
        "dataset is a file": [str(tmp_path / "file.txt")],
        "empty dataset": [str(tmp_path / "empty")],
        "unknown object": [str(dataset), "--objects", str(tmp_path / "list.txt")],
        "missing list": [str(dataset), "--objects", str(tmp_path / "none.txt")],
        "bad mode": [str(dataset), "--set", "eval.mode=sideways"],
        "bad texture size": [str(dataset), "--set", "refine.bake.texture_size=1000"],
        "corrupt checkpoint": [
            str(dataset),
            "--set",
            "eval.mode=generated",
            "--set",
            f"sv3d.checkpoint={tmp_path / 'file.txt'}",
        ],
        "force and rescore": [str(dataset), "--force", "--set", "eval.rescore=true"],
    }[case]
    assert main(["eval", *args, "-o", str(out), "--preset", "toy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sv3d: error:") and "\n" not in err
    if case == "unknown object":
        assert "'teapot'" in err
    assert not out.exists()


def test_sds_on_without_a_checkpoint_is_refused_before_any_object(dataset, tmp_path, capsys, monkeypatch):
    """`--preset paper` (SDS on) with $SV3D_CHECKPOINT unset rendered and fitted every object, then failed
    each in its refinement; now the batch stops first, in one line."""
    monkeypatch.delenv("SV3D_CHECKPOINT", raising=False)
    out = tmp_path / "out"
    assert main(["eval", str(dataset), "-o", str(out), "--preset", "toy", "--set", "refine.sds=on"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no SV3D checkpoint" in err and "\n" not in err and not out.exists()


def test_object_list_selects_and_orders(dataset, tmp_path, monkeypatch, capsys):
    fake = _fake(monkeypatch, dataset)
    (tmp_path / "list.txt").write_text("plate\n\n")
    assert (
        main(
            [
                "eval",
                str(dataset),
                "-o",
                str(tmp_path / "o"),
                "--preset",
                "toy",
                "--objects",
                str(tmp_path / "list.txt"),
            ]
        )
        == 0
    )
    assert fake.calls == ["plate"]
    assert [r["object"] for r in json.loads((tmp_path / "o/summary.json").read_text())["objects"]] == [
        "plate"
    ]
    # the same through Hydra's key (it was ignored: every object ran), and eval.dataset is refused there
    args = ["eval", str(dataset), "-o", str(tmp_path / "o2"), "--preset", "toy"]
    assert main([*args, "--set", "eval.objects=[plate]"]) == 0
    assert fake.calls == ["plate", "plate"]
    assert main([*args, "--set", f"eval.dataset={dataset}"]) == 2
    assert "the dataset is the command's first argument" in capsys.readouterr().err


def test_summarize_by_hand():
    config = EvalConfig(fscore_thresholds=(0.05,))
    metric = lambda c, i: {"chamfer": c, "volume_iou": i, "fscore@0.05": 1.0 - c}  # noqa: E731
    records = [
        {
            "object": o,
            "status": "ok",
            "flagged": f,
            "final": metric(c, 0.5),
            "nerf": metric(c, 0.4),
            "hull": metric(2 * c, 0.3),
        }
        for o, c, f in (("a", 0.01, False), ("b", 0.02, True), ("c", 0.06, False))
    ] + [{"object": "d", "status": "error", "error": "E: x"}]
    s = summarize(records, config)
    assert (s["n_objects"], s["n_ok"], s["n_failed"], s["n_flagged"]) == (4, 3, 1, 1)
    assert s["aggregate"]["mean"]["final"]["chamfer"] == pytest.approx(0.03)  # (0.01 + 0.02 + 0.06) / 3
    assert s["aggregate"]["median"]["final"]["chamfer"] == pytest.approx(0.02)
    assert s["aggregate"]["mean"]["hull"]["chamfer"] == pytest.approx(0.06)
    assert s["aggregate"]["median"]["hull"]["fscore@0.05"] == pytest.approx(0.96)


def test_aggregate_sweep_one_table_with_overrides(tmp_path):
    config = EvalConfig(fscore_thresholds=(0.05,))
    for job, (steps, chamfer) in enumerate([(20, 0.05), (40, 0.03)]):
        d = tmp_path / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra/overrides.yaml").write_text(f"- preset=toy\n- nerf.train.steps={steps}\n")
        m = {"chamfer": chamfer, "volume_iou": 0.5, "fscore@0.05": 0.9}
        s = summarize([{"object": "x", "status": "ok", "final": m, "nerf": m, "hull": m}], config)
        (d / "summary.json").write_text(json.dumps(s))
    paths = aggregate_sweep(tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["job"], r["nerf.train.steps"], r["preset"]) for r in rows] == [
        ("0", "20", "toy"),
        ("1", "40", "toy"),
    ]
    assert [float(r["chamfer"]) for r in rows] == [0.05, 0.03]
    assert "| nerf.train.steps |" in paths["md"].read_text()
    with pytest.raises(InputError, match="no evaluation summaries"):
        aggregate_sweep(tmp_path / "0" / ".hydra")


@pytest.mark.slow
def test_real_pipeline_interrupted_and_rerun_equals_straight_run(dataset, tmp_path, monkeypatch, toy):
    """preset=toy through the real NeRF and DMTet stages: killed on the second object, rerun, and the
    summary equals an uninterrupted run's (the stages are seeded, so the figures repeat exactly)."""
    monkeypatch.undo()  # the real pipeline
    config, run = toy
    # Colour gradients on the geometry carry the CPU's thread-order float noise into the toy shapes (two
    # identical toy runs measured F@0.02 0.254 vs 0.274): this test is about resuming, so they are off here.
    run.refine.refine.color_moves_geometry = False
    # The open-cavity start is a choice between two fits by their losses: float noise near its threshold
    # could flip it between the two runs; one start keeps this test about resuming.
    run.refine.open_cavities = "never"
    torch.set_num_threads(2)
    straight = evaluate_dataset(dataset, tmp_path / "a", config, run, progress=False)
    assert straight.summary["n_ok"] == 2, straight.summary

    real = sv3d.run.run_from_orbit

    def stop_on_plate(orbit_dir, output_dir, *args, **kwargs):
        if Path(output_dir).name == "plate":
            raise KeyboardInterrupt
        return real(orbit_dir, output_dir, *args, **kwargs)

    monkeypatch.setattr(sv3d.run, "run_from_orbit", stop_on_plate)
    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(dataset, tmp_path / "b", config, run, progress=False)
    monkeypatch.undo()
    blob = (tmp_path / "b/blob/metrics.json").read_bytes()
    resumed = evaluate_dataset(dataset, tmp_path / "b", config, run, progress=False)
    assert (tmp_path / "b/blob/metrics.json").read_bytes() == blob  # kept, not recomputed
    # The same summary up to the stages' own run-to-run float noise: the DMTet stage is not bit-reproducible
    # on CPU (measured: the final Chamfer of one object moved by 0.3% between two identical runs, and in one
    # full-suite run a toy F@0.02 by 0.024, 0.436 vs 0.460), while the evaluation adds none (the
    # fake-pipeline test above compares the files byte for byte).
    a, b = resumed.summary, straight.summary
    assert {k: v for k, v in a.items() if k not in ("objects", "aggregate")} == {
        k: v for k, v in b.items() if k not in ("objects", "aggregate")
    }
    for row_a, row_b in zip(a["objects"], b["objects"], strict=True):
        assert (row_a["object"], row_a["status"]) == (row_b["object"], row_b["status"])
        for source in ("final", "nerf", "hull"):
            for metric, value in row_b[source].items():  # F-scores of toy shapes move most (above)
                tolerance = 0.04 if metric.startswith("fscore") else 0.02
                assert row_a[source][metric] == pytest.approx(value, rel=0.05, abs=tolerance), metric
        assert row_a["hull"] == row_b["hull"]  # carved from the same renders: exact
    shutil.rmtree(tmp_path / "a")


@pytest.mark.slow
def test_generated_mode_end_to_end_with_the_tiny_checkpoint(dataset, tmp_path, sv3d_tiny, monkeypatch):
    """`sv3d eval --mode generated` through the real pipeline with the tiny random-weight SV3D model from
    the fixtures (plumbing, not quality): every object gets a mesh.glb and finite metrics."""
    monkeypatch.undo()  # the real pipeline
    objects = tmp_path / "objects.txt"
    objects.write_text("blob\n")
    out = tmp_path / "eval"
    args = ["eval", str(dataset), "-o", str(out), "--mode", "generated", "--objects", str(objects)]
    args += ["--checkpoint", str(sv3d_tiny / "tiny_sv3d_p.safetensors")]
    args += ["--sgm-config", str(sv3d_tiny / "tiny_sv3d_p.yaml"), "--preset", "toy"]
    # The tiny model's frames are noise over the whole frame, so its NeRF can fill the field's whole sphere:
    # a wider tet grid keeps that init inside it (as tests/test_run.py's toy refine config).
    args += ["--set", "refine.refine.tet.bound=0.8"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "generated" and summary["n_ok"] == 1, summary
    assert (out / "blob" / "mesh.glb").is_file()
    metrics = json.loads((out / "blob" / "metrics.json").read_text())
    for source in ("final", "nerf", "hull"):
        assert all(np.isfinite(v) for v in metrics[source].values() if isinstance(v, float)), source

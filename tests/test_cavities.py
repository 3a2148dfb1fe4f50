"""The refinement's open-cavity start: the init SDF hollowed out and opened upwards."""

from __future__ import annotations

import pytest
import torch

from refine.cavities import cavity_fit_gain, open_cavities
from refine.tetgrid import tet_grid

R, BOUND = 32, 0.55


def _lattice() -> torch.Tensor:
    return tet_grid(R, BOUND).vertices  # [(R+1)^3, 3], z fastest


def _box_sdf(points: torch.Tensor, half: float) -> torch.Tensor:
    q = points.abs() - half
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)  # [N] exact box SDF


def test_a_solid_box_becomes_an_open_shell_of_the_given_thickness():
    p = _lattice()
    sdf = _box_sdf(p, 0.3)
    opened = open_cavities(sdf, R, BOUND, thickness=0.06)
    cell = 2 * BOUND / R
    # Walls and floor stay: points within the thickness under the sides and bottom are still inside.
    depth = 0.3 - p[:, 0]  # under the +x face
    wall = (depth > 0.005) & (depth < 0.06 - cell) & (p[:, 1].abs() < 0.2) & (p[:, 2].abs() < 0.2)
    assert wall.any() and (opened[wall] < 0).all()
    height = p[:, 2] + 0.3  # over the bottom face
    floor = (height > 0.005) & (height < 0.06 - cell) & (p[:, :2].abs() < 0.2).all(dim=-1)
    assert floor.any() and (opened[floor] < 0).all()
    # The core and everything above it, through the top face, is removed: the top is open.
    core = (p.abs() < 0.15).all(dim=-1)
    top = (p[:, 2] - 0.29).abs() < cell / 2
    top &= (p[:, :2].abs() < 0.15).all(dim=-1)
    assert (opened[core] > 0).all() and (opened[top] > 0).all()
    # Never adds material: the outside stays outside.
    assert (opened >= sdf - 1e-6).all() and (opened[sdf > 0] > 0).all()


def test_a_thin_object_has_no_cavity_to_open():
    p = _lattice()
    plate = torch.maximum(_box_sdf(p, 0.4), p[:, 2].abs() - 0.02)  # 4 cm thick slab
    assert torch.equal(open_cavities(plate, R, BOUND, thickness=0.03), plate)


def test_open_cavities_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resolution"):
        open_cavities(torch.zeros(10), R, BOUND, 0.03)
    with pytest.raises(ValueError, match="thickness"):
        open_cavities(torch.zeros((R + 1) ** 3), R, BOUND, 0.0)


def test_cavity_fit_gain_counts_only_where_the_opened_surface_lies_deeper():
    shape = (2, 4, 4)
    plain_rgb, plain_depth = torch.ones(shape), torch.full(shape, 2.0)
    plain_depth[1, 3] = 0.0  # a row the plain surface does not cover
    open_rgb, open_depth = plain_rgb.clone(), plain_depth.clone()
    open_depth[0, :2] = 2.5  # 8 pixels looking into the cavity: half their error removed
    open_rgb[0, :2] = 0.5
    open_rgb[1, :2] = 0.0  # same depth (rims, edges): better fitted, not counted
    open_depth[1, 2, :2], open_rgb[1, 2, :2] = 2.02, 0.0  # deeper by less than the wall: not counted
    open_depth[1, 2, 2:], open_rgb[1, 2, 2:] = 1.5, 0.0  # in front of the plain surface: not counted
    open_depth[1, 3], open_rgb[1, 3] = 3.0, 0.0  # not covered by the plain start: not counted (its
    # error there is in the total: 32 pixels)
    gain = cavity_fit_gain(plain_rgb, plain_depth, open_rgb, open_depth, thickness=0.03)
    assert gain["gain"] == pytest.approx(8 * 0.5 / 32) and gain["pixels"] == pytest.approx(8 / 28)
    worse = cavity_fit_gain(plain_rgb, plain_depth, open_rgb + 1.0, open_depth, thickness=0.03)
    assert worse["gain"] == pytest.approx(-8 * 0.5 / 32)  # a worse fit there is a negative gain
    with pytest.raises(ValueError, match="one shape"):
        cavity_fit_gain(plain_rgb, plain_depth[0], open_rgb, open_depth, 0.03)
    with pytest.raises(ValueError, match="thickness"):
        cavity_fit_gain(plain_rgb, plain_depth, open_rgb, open_depth, 0.0)


def _cup(lid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A cup of radius 0.3, 0.3 tall, walls and bottom 0.05 thick: open, or closed at its rim by a lid."""
    import trimesh

    if lid:
        mesh = trimesh.creation.cylinder(radius=0.3, height=0.3, sections=48)
    else:
        wall = trimesh.creation.annulus(r_min=0.25, r_max=0.3, height=0.3, sections=48)
        bottom = trimesh.creation.cylinder(radius=0.25, height=0.05, sections=48)
        bottom.apply_translation((0.0, 0.0, -0.125))
        mesh = trimesh.util.concatenate([wall, bottom])
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)


def _painted(side: float = 0.6):
    """Colour of a cup: `side` grey outside; stripes across x inside (r < 0.27 above the bottom's base: the
    open cup's inner wall and floor, the lid's middle), the same on the lid and inside seen from above."""

    def color(points: torch.Tensor) -> torch.Tensor:
        inner = (points[:, :2].norm(dim=-1) < 0.27) & (points[:, 2] > -0.1)
        stripes = (0.5 + 0.4 * torch.sin(25.0 * points[:, :1])).expand_as(points)
        return torch.where(inner[:, None], stripes, torch.full_like(points, side))

    return color


def test_cavity_fit_gain_on_renders_of_an_open_and_a_lidded_cup():
    """Through the refinement's own maps, seen from 30 degrees up, with the inside (or the lid) striped and
    each start painted as it would be seen from straight above. Frames of the open cup: the lidded start
    cannot show the striped inner walls from every view at once, and the open start removes most of its
    error where it looks into the cup. Frames of the lidded cup (and both starts a little off in their
    sides' grey): the open start cannot show the lid's stripes, and is the worse where it looks in."""
    from types import SimpleNamespace

    from refine.fit import frame_error_maps, render_surface
    from sv3d.cameras import static_orbit

    res = 64
    cameras = static_orbit(30.0, 0.0, num_frames=4).cameras()

    def start(lid: bool, side: float) -> SimpleNamespace:
        vertices, faces = _cup(lid)
        geometry = SimpleNamespace(extract=lambda: (vertices, faces))
        return SimpleNamespace(geometry=geometry, color=_painted(side))

    def frames(lid: bool) -> torch.Tensor:  # [V, res, res, 4] straight RGBA
        vertices, faces = _cup(lid)
        out = render_surface(vertices, faces, _painted(), cameras, res, with_normals=False)
        rgb = ((out.image - (1.0 - out.alpha)) / out.alpha.clamp(min=1e-6)).clamp(0, 1)
        return torch.cat([rgb, out.alpha], dim=-1)

    def gain(images, plain, opened) -> dict[str, float]:
        a = frame_error_maps(plain, images, cameras, res)
        b = frame_error_maps(opened, images, cameras, res)
        return cavity_fit_gain(a.rgb, a.depth, b.rgb, b.depth, thickness=0.03)

    bowl = gain(frames(lid=False), start(True, 0.6), start(False, 0.6))
    box = gain(frames(lid=True), start(True, 0.55), start(False, 0.55))
    assert bowl["gain"] > 0.5 and 0.05 < bowl["pixels"] < 0.5  # measured 0.99 and 0.30
    assert box["pixels"] == pytest.approx(bowl["pixels"]) and box["gain"] < -0.1  # measured -16.8


class _Frames:
    """The two things `_refine_starts` reads of an orbit: its images and its cameras."""

    images = torch.zeros(2, 8, 8, 4)

    class orbit:  # noqa: N801
        @staticmethod
        def cameras():
            return None


def _starts(
    monkeypatch, init_sdf, cavity: float, rest: float = 1.0, open_step_loss: float = 0.01, **overrides
):
    """Run `_refine_starts` with a stand-in refinement over two 8x8 views: each start reports a constant
    step loss (the open start `open_step_loss`, the init 0.01); the init's renders end with RGB error 1.0
    per pixel at depth 1, the open start's with `cavity` in the first view, where it lies deeper (looking
    into its cavity), and `rest` in the second at the init's depth. The open start's share of the init's
    error removed in its cavity: (1 - cavity) / 2."""
    from types import SimpleNamespace

    import sv3d.refine_stage as stage
    from refine.fit import FrameErrorMaps

    def refine(images, cameras, sdf, config, guidance, device, progress, floor_height=None):
        assert floor_height == -0.25  # both starts are cut at the floor handed to the stage
        name = "init" if torch.equal(sdf, init_sdf) else "open"
        for step in range(1, config.steps + 1):
            progress(step, {"rgb": open_step_loss if name == "open" else 0.01, "mask": 0.0})
        return SimpleNamespace(name=name, seconds=0.0)

    monkeypatch.setattr(stage, "refine_surface", refine)

    def maps(result, *args):  # the open start's coverage error is the worse: only colours decide
        ones = torch.ones(2, 8, 8)
        if result.name == "init":
            return FrameErrorMaps(rgb=ones, mask=ones * 0.5, depth=ones)
        depth, rgb = ones.clone(), ones * rest
        depth[0], rgb[0] = 1.5, cavity
        return FrameErrorMaps(rgb=rgb, mask=ones * 0.8, depth=depth)

    monkeypatch.setattr(stage, "frame_error_maps", maps)
    config = stage.RefineStageConfig(**overrides)
    config.refine.steps = 20
    grid = SimpleNamespace(resolution=R, bound=BOUND)
    report = lambda *a: None  # noqa: E731
    result, starts = stage._refine_starts(_Frames, init_sdf, grid, config, None, "cpu", report, -0.25)
    return result.name, starts


def test_the_open_start_is_kept_only_when_it_explains_the_frames_clearly_better_in_its_cavity(monkeypatch):
    box = _box_sdf(_lattice(), 0.3)
    name, starts = _starts(monkeypatch, box, cavity=0.3)  # 35% of the init's error removed (bowl: 30%)
    assert name == "open" and [s["chosen"] for s in starts] == [False, True]
    assert starts[1]["removed"] > 0.5 and starts[1]["cavity_gain"] == pytest.approx(0.35)
    assert starts[1]["cavity_pixels"] == pytest.approx(0.5)
    # 5% in the cavity, 30% overall: the rest fitted better (the closed box: 3% and 17.5%, at its rim)
    name, starts = _starts(monkeypatch, box, cavity=0.9, rest=0.5)
    assert name == "init" and [s["chosen"] for s in starts] == [True, False]
    assert starts[1]["frame_rgb"] == pytest.approx(0.7) and starts[1]["cavity_gain"] == pytest.approx(0.05)
    name, starts = _starts(monkeypatch, box, cavity=0.9, cavity_gain=0.04)
    assert name == "open"
    # Better in its cavity but worse overall: the init stays
    name, starts = _starts(monkeypatch, box, cavity=0.3, rest=1.8)
    assert name == "init" and starts[1]["cavity_gain"] == pytest.approx(0.35)


def test_a_far_worse_open_start_is_stopped_early(monkeypatch):
    box = _box_sdf(_lattice(), 0.3)
    name, starts = _starts(monkeypatch, box, cavity=0.0, open_step_loss=0.03)  # 3x the init's steps
    assert name == "init" and "step 5" in starts[1]["abandoned"]  # a quarter of 20 steps
    assert "frame_loss" not in starts[1]


def test_no_second_start_when_off_or_when_nothing_would_open(monkeypatch):
    p = _lattice()
    box = _box_sdf(p, 0.3)
    name, starts = _starts(monkeypatch, box, cavity=0.0, open_cavities="never")
    assert name == "init" and len(starts) == 1 and starts[0]["chosen"]
    slab = torch.maximum(_box_sdf(p, 0.4), p[:, 2].abs() - 0.02)
    name, starts = _starts(monkeypatch, slab, cavity=0.0)
    assert name == "init" and "skipped" in starts[1]


def test_always_refines_the_opened_init_only_or_the_init_when_nothing_opens(monkeypatch):
    p = _lattice()
    box = _box_sdf(p, 0.3)
    # Kept although it fits the frames worse, and not stopped at a quarter of the steps although its
    # steps' loss is 3x the init's would be: there is no init start to compare with
    name, starts = _starts(
        monkeypatch, box, cavity=1.5, rest=1.5, open_step_loss=0.03, open_cavities="always"
    )
    assert name == "open" and len(starts) == 1
    assert starts[0]["start"] == "open cavities" and starts[0]["chosen"] and starts[0]["removed"] > 0.5
    assert starts[0]["frame_rgb"] == 1.5
    slab = torch.maximum(_box_sdf(p, 0.4), p[:, 2].abs() - 0.02)  # too thin to have a cavity
    name, starts = _starts(monkeypatch, slab, cavity=0.0, open_cavities="always")
    assert name == "init" and [s["chosen"] for s in starts] == [True, False] and "skipped" in starts[1]


def test_an_unknown_open_cavities_mode_is_a_one_line_error(tmp_path):
    from sv3d.errors import InputError
    from sv3d.refine_stage import RefineStageConfig, refine_stage
    from sv3d.render_orbit import RenderOrbitConfig, render_orbit
    from sv3d.testing.objects import write_test_object

    orbit = render_orbit(
        write_test_object(tmp_path / "objects", "blob"), tmp_path / "orbit", RenderOrbitConfig(resolution=32)
    )
    with pytest.raises(InputError, match="open_cavities must be one of auto, always, never, got 'yes'"):
        refine_stage(orbit, tmp_path / "init.ply", tmp_path / "out", RefineStageConfig(open_cavities="yes"))
    assert not (tmp_path / "out").exists()  # nothing created

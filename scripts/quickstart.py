"""A newcomer's first read: the whole flow that exists today, on a built-in object, in ~30 lines.

    python scripts/quickstart.py [OUTPUT_DIR]

Writes a test object in GSO layout, renders SV3D's 21-view orbit of it (the frames the 3D stages are fed),
carves the visual-hull baseline from the frames' masks and scores it with the evaluation protocol.
"""

import sys
from pathlib import Path

from sv3d.cameras import read_orbit_directory
from sv3d.evaluation.metrics import evaluate_mesh
from sv3d.evaluation.visual_hull import carve_visual_hull
from sv3d.meshio import load_trimesh
from sv3d.render_orbit import RenderOrbitConfig, render_orbit
from sv3d.testing.objects import write_test_object

out = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart_output")
obj = write_test_object(out / "objects", "bowl")  # 1. ground truth: <obj>/meshes/model.obj + texture
orbit_dir = render_orbit(obj, out / "orbit", RenderOrbitConfig(resolution=256), overwrite=True)  # 2. frames
frames = read_orbit_directory(orbit_dir)  # 3. what every later stage reads: RGBA frames + cameras
hull = carve_visual_hull(frames.masks(), frames.orbit.cameras(), resolution=96)  # 4. the baseline
metrics = evaluate_mesh(hull, load_trimesh(obj), mode="oracle")  # 5. Chamfer, F-score, volume IoU
print(f"{len(frames.orbit)} frames in {orbit_dir}; visual hull vs ground truth: {metrics.to_dict()}")

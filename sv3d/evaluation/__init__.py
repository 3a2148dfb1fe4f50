"""Evaluation protocol (ARCHITECTURE.md): visible-surface Chamfer / F-score, winding-number volume IoU, and
the visual-hull baseline."""

from .metrics import (
    MeshMetrics,
    chamfer_distance,
    evaluate_mesh,
    fscore,
    normalize_prediction,
    sample_visible_surface,
    volume_iou,
)
from .visual_hull import carve_visual_hull, visual_hull_from_orbit_dir
from .winding import winding_numbers

__all__ = [
    "MeshMetrics",
    "carve_visual_hull",
    "chamfer_distance",
    "evaluate_mesh",
    "fscore",
    "normalize_prediction",
    "sample_visible_surface",
    "visual_hull_from_orbit_dir",
    "volume_iou",
    "winding_numbers",
]

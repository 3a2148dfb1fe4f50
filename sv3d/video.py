"""Preview videos (mp4, H.264 through imageio's ffmpeg), written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["write_video"]


def write_video(path: str | Path, frames: np.ndarray, fps: int = 7, background: float = 1.0) -> Path:
    """Write [T, H, W, 3|4] frames in [0, 1] (RGBA composited over `background`) as an mp4; atomic."""
    import imageio.v2 as imageio

    path = Path(path)
    if frames.shape[-1] == 4:
        frames = frames[..., :3] * frames[..., 3:] + background * (1.0 - frames[..., 3:])
    data = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # [T, H, W, 3]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a video is for everyone
    try:
        imageio.mimwrite(
            tmp,
            list(data),
            fps=fps,
            codec="libx264",
            quality=8,
            macro_block_size=16,
            ffmpeg_log_level="error",
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

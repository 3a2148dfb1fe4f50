"""Stage 2: Instant-NGP-style NeRF (hash grid + small MLP, nerfacc sampling) and coarse mesh extraction."""

__all__: list[str] = []

"""Errors the user can act on. The CLI prints them as one line (`sv3d: error: ...`) and exits non-zero."""


class Sv3dError(Exception):
    """Base class: a problem with the user's input, files or environment, stated in one line."""


class InputError(Sv3dError):
    """A file or argument given by the user is missing, unreadable or invalid."""


class MeshLoadError(InputError):
    """A mesh file cannot be used: missing, corrupt, empty, non-finite, or missing a texture."""


class OrbitDirectoryError(InputError):
    """An orbit directory (transforms.json + frames) is missing pieces or inconsistent."""

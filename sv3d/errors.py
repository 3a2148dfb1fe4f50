"""Errors the user can act on. The CLI prints them as one line (`sv3d: error: ...`) and exits non-zero."""


class Sv3dError(Exception):
    """Base class: a problem with the user's input, files or environment, stated in one line."""


class InputError(Sv3dError):
    """A file or argument given by the user is missing, unreadable or invalid."""


class MeshLoadError(InputError):
    """A mesh file cannot be used: missing, corrupt, empty, non-finite, or missing a texture."""


class OrbitDirectoryError(InputError):
    """An orbit directory (transforms.json + frames) is missing pieces or inconsistent."""


OUT_OF_MEMORY_HINT = (
    "out of memory: try --offload for SV3D sampling (a rerun keeps the finished stages), or --sds off and "
    "smaller sizes (--tet-resolution, --texture-size, --resolution: another run, so another -o or --force)"
)


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: torch's OutOfMemoryError (CUDA), its CPU allocator's
    RuntimeError, or Python's MemoryError."""
    import sys

    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def one_line(exc: BaseException) -> str:
    """The one-line message of an error the user can act on: an Sv3dError's text, or an OSError's file and
    reason (permissions, a full disk, an output path under a file)."""
    if isinstance(exc, OSError) and not isinstance(exc, Sv3dError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return str(exc)


def listing(items, shown: int = 5) -> str:
    """The first `shown` items, comma-separated, and how many more: keeps a message about thousands of
    checkpoint keys to one readable line."""
    items = [str(i) for i in items]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def brief(error: BaseException) -> str:
    """ "Type: message" on one line (at most 200 characters of message): a library's error quoted in ours."""
    text = " ".join(str(error).split()) or "no details"
    return f"{type(error).__name__}: {text[:200]}"

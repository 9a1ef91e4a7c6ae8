"""Where fedtext keeps its cache, and atomic file writes (nothing half-written is ever left)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache directory: `override`, else $FEDTEXT_CACHE, else $XDG_CACHE_HOME/fedtext."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("FEDTEXT_CACHE"):
        return Path(os.environ["FEDTEXT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedtext"


def ordinary_mode() -> int:
    """The permissions of an ordinary new file under this process's umask (e.g. 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it over `path` (atomic on POSIX).

    The file gets ordinary permissions (mkstemp's are 0600), so results stay shareable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)

"""Writing files so that a reader never sees half of one, and a crash leaves no partial output.

* ``atomic_write_bytes(path, data)``, ``atomic_write_text(path, text)``,
  ``atomic_write_json(path, obj, **json_kwargs)``, ``atomic_torch_save(obj, path)``: write a
  temporary file in the same directory, flush and fsync it, rename it over ``path``
  (``os.replace`` is atomic on one file system), then fsync the directory so the rename itself
  survives a crash. On any error the temporary file is removed and ``path`` is untouched.
  Parent directories are created.
* ``staging_dir(out)``: a context manager giving a fresh temporary sibling directory of
  ``out`` to build results in; it is removed when the block ends, whatever happens.
* ``publish_dir(tmp, out)``: move every entry of ``tmp`` into ``out`` (created), replacing
  entries of the same name; other entries of ``out`` stay.
* ``replace_dir(tmp, out)``: rename ``tmp`` to ``out`` as a whole, removing an old ``out``.
* ``file_sha256(path)``: the hex sha256 of a file's bytes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "staging_dir",
           "publish_dir", "replace_dir", "file_sha256"]


def _fsync_dir(directory: Path) -> None:
    try:  # make the rename itself durable; not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write: Callable[[Any], None]) -> Path:
    """Run ``write(binary file)`` on a temp file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path, obj, *, indent: int | None = 2, newline: bool = True, **json_kwargs) -> Path:
    """``json.dumps(obj, indent=indent, **json_kwargs)`` (plus a final newline) written atomically.
    The JSON is built before the file is touched, so an unserialisable ``obj`` leaves no file."""
    text = json.dumps(obj, indent=indent, **json_kwargs) + ("\n" if newline else "")
    return atomic_write_text(path, text)


def atomic_torch_save(obj, path) -> Path:
    """``torch.save(obj, path)``, atomically."""
    import torch

    return _atomic_write(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def staging_dir(out):
    """A new empty directory beside ``out`` (``.<name>.tmp-XXXX``), removed when the block ends."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish_dir(tmp, out) -> Path:
    """Move every entry of ``tmp`` into ``out`` (created), replacing entries of the same name.
    Each entry is renamed, not copied, so ``tmp`` should be on the same file system
    (``staging_dir(out)`` makes it a sibling)."""
    tmp, out = Path(tmp), Path(out)
    if not tmp.is_dir():
        raise NotADirectoryError(f"{tmp}: not a directory to publish")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(tmp.iterdir()):
        dest = out / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(entry, dest)
    _fsync_dir(out)
    return out


def replace_dir(tmp, out) -> Path:
    """Rename the filled directory ``tmp`` (a sibling: ``staging_dir(out)``) to ``out``, removing
    an old ``out`` first, so ``out`` holds exactly what ``tmp`` held."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def file_sha256(path) -> str:
    """The hex sha256 of the file at ``path`` (read in chunks)."""
    import hashlib

    h = hashlib.sha256()   # (hashlib.file_digest needs Python 3.11; pinpoint supports 3.10)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root(cache_dir=None) -> Path:
    """Where pinpoint caches what it builds (organisms, model-family replicas): ``cache_dir``,
    $PINPOINT_CACHE, $XDG_CACHE_HOME/pinpoint or ~/.cache/pinpoint."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PINPOINT_CACHE"):
        return Path(os.environ["PINPOINT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "pinpoint"
    return Path.home() / ".cache" / "pinpoint"

"""The ``--out`` policy of every command: nothing a user owns is overwritten silently.

* A non-empty ``--out`` is refused unless the same command made it (its marker file
  ``.pinpoint-run.json`` names the command) or ``--overwrite`` is given.
* A lock (``.pinpoint.lock``, ``flock``) makes a second run into the same ``--out`` fail fast
  with a clear message while the first is still writing.
* Results are built in a temporary sibling directory and renamed into place when the command
  succeeds (``files.staging_dir`` / ``files.publish_dir``), so a failed or interrupted run
  leaves the earlier contents of ``--out`` as they were. The marker lists what was published;
  a rerun of the same command removes its last run's outputs that it does not write again,
  so no stale result sits beside new ones (nothing else in ``--out`` is touched).
* Under ``torchrun`` (``RANK`` set), only rank 0 writes ``--out``.
* Nothing is created before :meth:`OutDir.open`: a command validates everything first and
  calls ``check()`` early, so bad input leaves no directory behind.

Locking uses ``fcntl.flock``: POSIX systems only (pinpoint's kernels build on those).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError

__all__ = ["OutDir", "MARKER_NAME", "LOCK_NAME"]

MARKER_NAME = ".pinpoint-run.json"
LOCK_NAME = ".pinpoint.lock"
_OWN = (MARKER_NAME, LOCK_NAME)


def _own(name: str) -> bool:
    """pinpoint's marker and lock, and the marker's in-flight temporary (atomic write)."""
    return name in _OWN or (name.startswith(f".{MARKER_NAME}.") and name.endswith(".tmp"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class OutDir:
    """One command's ``--out`` directory. ``flag`` names the option in messages."""

    def __init__(self, path, *, command: str, overwrite: bool = False, flag: str = "--out"):
        self.path = Path(path)
        self.command = command
        self.overwrite = overwrite
        self.flag = flag

    def owner(self) -> str | None:
        """The command that made this directory (from its marker), or None."""
        try:
            info = json.loads((self.path / MARKER_NAME).read_text())
        except (OSError, ValueError):
            return None
        return info.get("command") if isinstance(info, dict) else None

    def foreign_entries(self) -> list[str]:
        """Names in ``--out`` other than pinpoint's own marker and lock files."""
        if not self.path.is_dir():
            return []
        return sorted(e.name for e in self.path.iterdir() if not _own(e.name))

    def check(self) -> None:
        """Refuse a path that is (under) a file, or a non-empty directory not made by this
        command (unless ``overwrite``). Creates nothing. Under torchrun only rank 0 checks:
        the other ranks never write ``--out``, and would race rank 0's own writes into it."""
        if os.environ.get("RANK", "0") != "0":
            return
        p = self.path
        for parent in [p, *p.parents]:
            if parent.exists():
                if not parent.is_dir():
                    where = "" if parent == p else f": {parent}"
                    raise UserError(f"{self.flag} {p}{where} exists and is not a directory")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise UserError(f"{self.flag} {p}: cannot write there (no write permission on {parent})")
                break
        entries = self.foreign_entries()
        if entries and not self.overwrite and self.owner() != self.command:
            owner = self.owner()
            what = f"it holds results of `pinpoint {owner}`" if owner else \
                f"it holds files pinpoint did not write ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})"
            raise UserError(f"{self.flag} {p} is not empty and {what}; choose another {self.flag}, or pass "
                            "--overwrite to write into it")

    @contextlib.contextmanager
    def open(self, *, stage: bool = True):
        """Create ``--out``, lock it and mark it as this command's; yield a staging directory
        (a temporary sibling) whose entries move into ``--out`` when the block succeeds.
        ``stage=False`` yields ``--out`` itself (for a command that stages by itself)."""
        from .files import publish_dir, staging_dir

        if os.environ.get("RANK", "0") != "0":
            # under torchrun every rank runs the command; rank 0 alone writes --out, so the other
            # ranks get a scratch directory that is removed afterwards, and take no lock
            with tempfile.TemporaryDirectory(prefix="pinpoint-rank-") as scratch:
                yield Path(scratch)
            return
        self.check()
        self._started = _now()
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.TemporaryFile(dir=self.path.parent)  # the staging sibling goes there
            probe.close()
        except PermissionError as exc:
            raise UserError(f"{self.flag} {self.path}: cannot write there ({exc.strerror}: {exc.filename})") from None
        ok = False
        try:
            with self._lock():
                self.check()  # another run may have written between the first check and the lock
                previous = self._previous_outputs()
                self._mark(finished=None, outputs=previous)
                if stage:
                    with staging_dir(self.path) as work:
                        yield work
                        outputs = sorted(e.name for e in work.iterdir())
                        publish_dir(work, self.path)
                    # a rerun's results replace the last run's whole: nothing stale stays beside them
                    self._remove(set(previous) - set(outputs))
                else:
                    yield self.path
                    outputs = None  # the command stages and publishes by itself: not tracked
                self._mark(finished=_now(), outputs=outputs)
                ok = True
        finally:
            if not ok and created and not self.foreign_entries():
                shutil.rmtree(self.path, ignore_errors=True)  # a failed first run leaves no empty --out

    def _previous_outputs(self) -> list[str]:
        """The entries this command's last run here published (from the marker)."""
        try:
            info = json.loads((self.path / MARKER_NAME).read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(info, dict) or info.get("command") != self.command:
            return []
        names = info.get("outputs") or []
        # only plain names directly under --out, never pinpoint's own files
        return [n for n in names if isinstance(n, str) and not _own(n) and n not in ("", ".", "..")
                and Path(n).name == n]

    def _remove(self, names) -> None:
        for name in sorted(names):
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()

    def _mark(self, *, finished, outputs) -> None:
        from . import __version__
        from .files import atomic_write_json

        atomic_write_json(self.path / MARKER_NAME, {
            "command": self.command, "argv": sys.argv[1:], "pinpoint": __version__,
            "started": self._started, "finished": finished, "outputs": outputs})

    @contextlib.contextmanager
    def _lock(self):
        import fcntl

        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                raise UserError(f"{self.flag} {self.path} is in use by another pinpoint run ({holder}); wait for "
                                f"it to finish, or choose another {self.flag}") from None
            # The lock file stays (unlinking it would let a third run lock a fresh inode).
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}, `pinpoint {self.command}` since {_now()}".encode())
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

"""Reading what a user hands in and writing run folders without losing, tearing or leaking files.

- `atomic_write_bytes` / `atomic_write_text`: a unique temporary name beside the destination, then a
  rename, so a reader (or a crash) never sees half a file and two processes never share a temp name;
- `check_no_symlink`: files the program writes inside a run folder must not be symlinks planted
  there (they would redirect the write out of the folder);
- `load_json`: JSON from a user's file with a one-line error for every way it can be bad, nesting
  included (Python's parser raises RecursionError on a few thousand nested brackets);
- `RunLock`: one process at a time per run folder;
- `clean_stale_temps`: temporary files left by a killed process are removed on the next run;
- `describe_os_error`: disk full and friends as one readable line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".easyref.lock"


class UnsafePathError(ValueError):
    """A path the program will not write through (a symlink planted in a run folder); one line."""


class JSONFileError(ValueError):
    """A user's JSON file that cannot be read; one line naming the file."""


class LockedError(RuntimeError):
    """Another process holds the run folder."""


# ---------------------------------------------------------------------------- writing
def check_no_symlink(path: str | Path, root: str | Path | None = None) -> None:
    """Refuse `path` (and every folder between `root` and it) if it is a symlink."""
    path = Path(path)
    parts = [path]
    if root is not None:
        root = Path(root)
        try:
            relative = path.relative_to(root)
        except ValueError:
            relative = None
        if relative is not None:
            parts = [root / Path(*relative.parts[: i + 1]) for i in range(len(relative.parts))]
    for part in parts:
        if part.is_symlink():
            where = f" in {root}" if root is not None else ""
            raise UnsafePathError(f"{part} is a symlink{where}; refusing to write through it (remove it first)")


def atomic_write_bytes(path: str | Path, data: bytes, root: str | Path | None = None, fsync: bool = True) -> Path:
    """Write `data` to `path` through a unique temporary file and a rename."""
    path = Path(path)
    check_no_symlink(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, root: str | Path | None = None, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), root=root, fsync=fsync)


def append_line(path: str | Path, text: str, root: str | Path | None = None, fsync: bool = False) -> None:
    """Append one line to a log in a run folder: never through a symlink, never into a pipe, and after
    a line a killed process left unfinished, on a fresh line rather than glued to it."""
    path = Path(path)
    check_no_symlink(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO):  # a symlink planted since the check; a FIFO without reader
            raise UnsafePathError(
                f"{path} is a symlink or a pipe; refusing to write through it (remove it first)"
            ) from None
        raise
    with os.fdopen(fd, "r+b") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{path} is not a regular file; refusing to write to it (remove it first)")
        data = text.encode("utf-8")
        if handle.seek(0, os.SEEK_END) and (handle.seek(-1, os.SEEK_END), handle.read(1))[1] != b"\n":
            data = b"\n" + data
        handle.write(data if data.endswith(b"\n") else data + b"\n")
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove `.NAME.*.tmp` files (and folders) a killed process left in `folder`; returns what went."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and not entry.is_symlink():
            if entry.is_dir():
                import shutil

                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d temporary file(s) left in %s by an interrupted run", len(removed), folder)
    return removed


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """One line for a write that failed: the cause in words, and the file."""
    where = f" writing {path}" if path is not None else (f" writing {err.filename}" if err.filename else "")
    if err.errno == errno.ENOSPC:
        return f"no space left on the device{where}"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}"
    if err.errno == errno.EROFS:
        return f"read-only file system{where}"
    return f"{err.strerror or type(err).__name__}{where}"


def is_disk_error(err: BaseException) -> bool:
    """True for the write failures a user can fix (full disk, quota, permissions), however they surface."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
        return True
    # torch's serializer turns a full disk into a bare RuntimeError from its C++ stream
    text = str(err)
    return isinstance(err, RuntimeError) and ("iostream error" in text or "file write failed" in text)


# ---------------------------------------------------------------------------- reading
def load_json(path: str | Path, what: str = "file") -> Any:
    """Parse a user's JSON file; every failure is a one-line JSONFileError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise JSONFileError(f"{path}: the {what} is not UTF-8 text") from None
    except OSError as err:
        raise JSONFileError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    return parse_json(text, f"{path}")


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONFileError(f"{where} is not valid JSON: {err}") from None
    except RecursionError:
        raise JSONFileError(f"{where}: JSON nested too deeply") from None
    except ValueError as err:  # an integer of over 4300 digits (Python's bound on int parsing)
        raise JSONFileError(f"{where} is not valid JSON: {err}") from None


def iter_jsonl(text: str):
    """(line number, value, problem) for each non-blank line of JSON Lines; `problem` is a one-line reason
    (value None) when the line is not JSON. Lines are split on "\n" only: JSON strings may hold U+2028
    and friends, which `splitlines()` would cut in two."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as err:
            yield number, None, f"invalid JSON: {err.msg} (column {err.colno})"
        except RecursionError:
            yield number, None, "invalid JSON: nested too deeply"
        except ValueError:  # an integer of over 4300 digits
            yield number, None, "invalid JSON: a number too long to read"


# ---------------------------------------------------------------------------- locking
class RunLock:
    """An advisory lock on a run folder (fcntl.flock on `.easyref.lock`); released when the process ends.

    Two processes writing one run folder would interleave records and race on images; the second is
    refused at once instead of waiting.
    """

    def __init__(self, folder: str | Path, what: str = "run folder"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        check_no_symlink(path, self.folder)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"another easyref process is using the {self.what} {self.folder}") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, harmlessly
            self._fd = None


def replace_folder(new: Path, dest: Path) -> None:
    """Put the finished folder `new` at `dest`; an existing `dest` is renamed aside first and removed
    after, so no crash leaves a half-deleted folder: between the two renames the previous one is whole
    at `.NAME.old.tmp`."""
    import shutil

    new, dest = Path(new), Path(dest)
    if dest.exists():
        old = dest.parent / f".{dest.name}.old.tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)

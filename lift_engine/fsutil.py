"""Atomic file and directory writes (docs/DESIGN.md §6).

Every write lands in a temporary sibling first, is fsync'ed, and is then renamed into
place, so a reader sees either the old content or the complete new content, never a
half-written file or directory — also after a crash or with concurrent writers.

    atomic_write_bytes(path, data)        file: temp file → fsync → os.replace → fsync dir
    atomic_write_text / atomic_write_json  the same for text / JSON
    with atomic_dir(dst) as tmp: ...      directory: fill `tmp`; on success it is fsync'ed
                                          and swapped in for `dst` (replace=True) or
                                          published only if `dst` does not exist yet
                                          (replace=False); on error `tmp` is removed.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"  # temp siblings are named ".<name>.tmp-<random>"
OLD_MARK = ".old-"  # replaced directories are parked as ".<name>.old-<random>" before removal


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (bottom-up), then `root` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


def _normal_file_modes(root: Path) -> None:
    """Give the files under `root` the mode a plain open() would (0666 & ~umask): mkstemp
    and safetensors' writer make them 0600, unreadable by a server running as another user."""
    mode = 0o666 & ~_umask()
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.chmod(os.path.join(dirpath, name), mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file beside it, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; publish with normal permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def _renameat2_exchange() -> Any:
    """libc renameat2 with RENAME_EXCHANGE (Linux ≥ 3.15), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths; False where the platform/filesystem cannot."""
    fn = _renameat2_exchange()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


def publish_dir(tmp: str | os.PathLike, dst: str | os.PathLike, replace: bool = True) -> bool:
    """Move the complete directory `tmp` to `dst`.

    replace=True: an existing `dst` is swapped out (atomic exchange where supported,
    else renamed aside, then the new one renamed in) and removed.
    replace=False: if `dst` already exists (another writer won), `tmp` is removed and
    False is returned. Returns True when `tmp` became `dst`.
    """
    tmp, dst = Path(tmp), Path(dst)
    try:
        os.rename(tmp, dst)  # fails if dst is a non-empty directory
        fsync_dir(dst.parent)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    if not dst.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "cannot replace a non-directory with a directory", str(dst))
    if exchange_paths(tmp, dst):  # tmp now holds the old content
        fsync_dir(dst.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return True
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}{OLD_MARK}", dir=dst.parent))
    os.rename(dst, old / "d")
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)
    return True


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temp directory beside `dst`; on normal exit fsync it and publish it as `dst`.

    The caller fills the yielded directory. On an exception the temp directory is
    removed and `dst` is untouched. See publish_dir for `replace` (use publish_dir
    directly to learn whether another writer won with replace=False).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{TMP_MARK}", dir=dst.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; publish with normal permissions
        yield tmp
        _normal_file_modes(tmp)
        fsync_tree(tmp)
        publish_dir(tmp, dst, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(dst: str | os.PathLike) -> None:
    """Remove leftovers of interrupted writes of `dst` (temp and parked-old siblings).

    Only call this while holding a lock that excludes other writers of `dst`.
    """
    dst = Path(dst)
    if not dst.parent.is_dir():
        return
    for entry in dst.parent.iterdir():
        if entry.name.startswith(f".{dst.name}{TMP_MARK}") or entry.name.startswith(f".{dst.name}{OLD_MARK}"):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if needed); blocks until acquired."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

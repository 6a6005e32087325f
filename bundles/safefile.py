"""Creating files safely: exclusively, never through a link, 0600, in a directory opened and checked first.

Every file the appliance and `bundles` create goes through here (stdlib only, so the light `bundles` package
can use it too). A planted link at a temp or final name in a shared folder is refused or gone around; it is
never followed, so nothing lands in an attacker's file:

- the directory is opened once (`O_DIRECTORY | O_NOFOLLOW` after resolving the name the user gave) and every
  later step works relative to that descriptor, so swapping the directory for a link meanwhile changes nothing;
- the temp name is random and created with `O_CREAT | O_EXCL | O_NOFOLLOW` (a planted file or link there fails
  the create, and another random name is tried);
- the final name is replaced by an atomic rename, and refused if it is a link (a rename would not follow it,
  but an operator who sees their "file" is a link should hear about it).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from bundles.errors import BundleError

CREATE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
TMP_TAG = ".tmp-"  # temp names are `.NAME.tmp-PID-RANDOM`; backups skip them
_TRIES = 16


class UnsafeFileError(BundleError):
    """A path that would make the appliance write through a link, or into something that is not a directory."""


def open_dir(path: Path) -> int:
    """A descriptor of directory `path` (its name resolved once), checked to be a real directory."""
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise UnsafeFileError(f"directory {path} does not exist", "create it first") from None
    except NotADirectoryError:
        raise UnsafeFileError(f"{path} is not a directory", "give a file name inside a directory") from None
    except OSError as e:  # ELOOP: it was swapped for a link after it was resolved
        raise UnsafeFileError(f"cannot open directory {path}: {e.strerror or e}", "check the path") from None
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{path} is not a directory", "give a file name inside a directory")
    return fd


def is_link_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except FileNotFoundError:
        return False


def create_at(dir_fd: int, name: str, mode: int = 0o600) -> int:
    """Create `name` in `dir_fd` exclusively (never through a link); its descriptor, mode `mode` exactly."""
    try:
        fd = os.open(name, CREATE_FLAGS, mode, dir_fd=dir_fd)
    except FileExistsError:
        raise UnsafeFileError(f"{name} already exists", "remove it or pick another name") from None
    except OSError as e:
        raise UnsafeFileError(f"cannot create {name}: {e.strerror or e}", "check the directory") from None
    os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
    return fd


def create_new(path: Path, mode: int = 0o600) -> BinaryIO:
    """Open a new file at `path` for writing: created exclusively (an existing file or link is refused)."""
    path = Path(path)
    dfd = open_dir(path.parent)
    try:
        return os.fdopen(create_at(dfd, path.name, mode), "wb")
    finally:
        os.close(dfd)


def _create_temp(dir_fd: int, name: str, mode: int) -> tuple[str, int]:
    for _ in range(_TRIES):
        tmp = f".{name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, CREATE_FLAGS, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue  # something is planted there: go around it
        os.fchmod(fd, mode)
        return tmp, fd
    raise UnsafeFileError(f"cannot create a temp file for {name}", "check who else writes in that directory")


@contextmanager
def atomic_create(path: Path, mode: int = 0o600, replace: bool = True) -> Iterator[BinaryIO]:
    """A binary file to stream into under a random temp name beside `path`; fsynced and renamed to `path` when
    the block ends, removed if it raises: `path` is either the old file or the whole new one, never half.

    A link at `path` is refused (before and again just before the rename); so is an existing file unless
    `replace`.
    """
    path = Path(path)
    dfd = open_dir(path.parent)
    try:
        _check_target(dfd, path, replace)
        tmp, fd = _create_temp(dfd, path.name, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            _check_target(dfd, path, replace)
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600, replace: bool = True) -> None:
    """`data` to `path` through `atomic_create`."""
    with atomic_create(path, mode, replace) as f:
        f.write(data)


def _check_target(dir_fd: int, path: Path, replace: bool) -> None:
    if is_link_at(dir_fd, path.name):
        raise UnsafeFileError(f"{path} is a symbolic link", "refusing to write through it; remove the link")
    if not replace:
        try:
            os.lstat(path.name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        raise UnsafeFileError(f"{path} exists", "pick another name")

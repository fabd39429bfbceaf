"""Creating oisp's files without handing anything to whoever controls the path.

`sudo oisp record` runs as root but writes in the invoking user's directory
(the CA, events, the hash key, key logs, captures). The user controls every name
in there, so root must never follow a symbolic link the user placed, never
chown by path, and never leave a recording or a key readable by others:

- a directory oisp writes in is opened with O_NOFOLLOW and checked on the
  descriptor: a symlink, or a data directory another user owns, is refused
  with an error that says what to do;
- files are opened relative to that descriptor with O_NOFOLLOW | O_CLOEXEC,
  created 0600 (directories 0700) and fchmod-ed, so no umask widens them;
- what root creates inside a directory the invoking user owns is given to the
  user with fchown on the open descriptor;
- an existing file or directory readable by group or others is reported once
  on stderr.

POSIX only where it matters: on Windows the CA key has its own ACL code
(oisp.proxy.ca) and the rest is plain creation.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO

from oisp.paths import data_dir as _data_dir, invoking_user

FILE_MODE = 0o600
DIR_MODE = 0o700
_POSIX = sys.platform != "win32"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_warned: set[str] = set()


class UnsafePathError(OSError):
    """oisp refuses to write through this path; the message names it and the way out."""


def _owner_uid() -> int:
    """Who the data directory must belong to: the sudo user, else whoever runs oisp."""
    ids = invoking_user()
    return ids[0] if ids else os.geteuid()


def private_dir(path: str | os.PathLike[str], *, data_dir: bool | None = None) -> int:
    """A descriptor of directory `path`, made (0700, missing parents too) if absent.

    Refused: a symlink at `path` or any directory created along the way. With
    `data_dir`, also refused: a directory that is not owned by the invoking user,
    and, under sudo, creating it anywhere but inside a directory the user owns
    (a linked ~/.local must not make root create directories in /etc). `data_dir`
    defaults to whether `path` is oisp's data directory. Another existing directory
    the user named is used as named, links and all: only what oisp makes must be its own."""
    path = Path(os.path.abspath(path))
    if not _POSIX:  # no descriptors of directories, no sudo: made as the user who runs oisp
        os.makedirs(path, exist_ok=True)
        return -1
    if data_dir is None:
        data_dir = path == Path(os.path.abspath(_data_dir()))
    missing: list[str] = []
    existing = path
    while not os.path.lexists(existing):
        missing.append(existing.name)
        existing = existing.parent
    if missing:
        fd = _open_dir(existing, follow=True)
        try:
            _check_creatable(fd, existing, path, data_dir)
            for name in reversed(missing):
                fd = _make_child_dir(fd, name, existing / name)
                existing = existing / name
        except BaseException:
            _close(fd)
            raise
        return fd
    fd = _open_dir(path, follow=not data_dir)
    try:
        st = os.fstat(fd)
        if not data_dir:
            return fd
        if st.st_uid != _owner_uid():
            raise UnsafePathError(
                f"the oisp data directory {path} belongs to uid {st.st_uid}, not to uid {_owner_uid()} who runs "
                f"oisp; oisp will not write there as root. Give it back (sudo chown -R {_owner_uid()} {path}) "
                f"or remove it, or point XDG_DATA_HOME at a directory you own")
        _warn_if_shared(path, st, DIR_MODE)
    except BaseException:
        _close(fd)
        raise
    return fd


def ensure_private_dir(path: str | os.PathLike[str], *, data_dir: bool | None = None) -> None:
    """private_dir for a caller that needs the directory, not its descriptor."""
    _close(private_dir(path, data_dir=data_dir))


def open_private(path: str | os.PathLike[str], *, append: bool = False, exclusive: bool = False,
                 directory_fd: int | None = None) -> int:
    """A write descriptor of `path`: created 0600, never through a symlink, never a device or FIFO.

    `append` keeps what is there, else the file is truncated; `exclusive` refuses an
    existing file. A file created inside a directory the invoking user owns is
    given to that user; an existing one keeps its owner and is only warned about
    if group or others can read it. `directory_fd`: `path` is a bare name in it."""
    path = Path(path)
    dir_fd = private_dir(path.parent) if directory_fd is None else directory_fd
    try:
        flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | _CLOEXEC | _BINARY | getattr(os, "O_NONBLOCK", 0)
        flags |= os.O_EXCL if exclusive else os.O_APPEND if append else 0
        try:  # tell creation from reuse, so only a file we made is chmod-ed and chown-ed
            fd, created = os.open(_name(path), flags | os.O_EXCL, FILE_MODE, **_at(dir_fd)), True
        except FileExistsError:
            if exclusive:
                raise
            fd, created = _open_existing(path, flags, dir_fd), False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"{path} is not a regular file; oisp writes only regular files")
            if created:
                _make_ours(fd, dir_fd, FILE_MODE)
            else:
                _warn_if_shared(path, st, FILE_MODE)
                if not append:
                    os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        if directory_fd is None:
            _close(dir_fd)


def open_private_file(path: str | os.PathLike[str], mode: str = "wb", **kw) -> BinaryIO:
    """open_private as a buffered binary file object: mode "wb", "ab" or "xb"."""
    fd = open_private(path, append=mode == "ab", exclusive=mode == "xb", **kw)
    return os.fdopen(fd, "ab" if mode == "ab" else "wb")


def write_replacing(path: str | os.PathLike[str], data: bytes, *, mode: int = FILE_MODE) -> None:
    """Write beside the target and rename over it, so a reader never sees half a file;
    neither the temporary name nor the target is followed if it is a symlink."""
    path = Path(path)
    dir_fd = private_dir(path.parent)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        try:  # a leftover of a run that died here; unlink removes a link itself, never its target
            os.unlink(_name(partial), **_at(dir_fd))
        except FileNotFoundError:
            pass
        fd = open_private(partial, exclusive=True, directory_fd=dir_fd)
        try:
            if mode != FILE_MODE and _POSIX:
                os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        except BaseException:
            os.unlink(_name(partial), **_at(dir_fd))
            raise
        os.replace(_name(partial), _name(path), **({"src_dir_fd": dir_fd, "dst_dir_fd": dir_fd} if _POSIX else {}))
    finally:
        _close(dir_fd)


_held: dict[str, tuple[int, str]] = {}


def keylog_name(path: str | os.PathLike[str]) -> str:
    """A name for `ssl.SSLContext.keylog_filename`, which OpenSSL's caller opens by path for itself.

    The file is created or opened here as open_private_file("ab") does, and held open;
    on Linux the name handed over is that descriptor's /proc/self/fd entry, which
    names the very file opened here, so a link put in its place afterwards changes
    nothing. Elsewhere the checked path itself."""
    key = os.path.abspath(path)
    if key not in _held:
        fd = open_private(path, append=True)
        proc_name = f"/proc/self/fd/{fd}"
        _held[key] = (fd, proc_name if os.path.exists(proc_name) else key)
    return _held[key][1]


def read_nofollow(path: str | os.PathLike[str]) -> bytes:
    """Read a file oisp made, refusing a symlink in its place (root must not read /etc/shadow as a CA key)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _BINARY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(_symlink_message(Path(path))) from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def refuse_link(path: str | os.PathLike[str]) -> None:
    """UnsafePathError if `path` is a symbolic link (for names that are looked at before opening)."""
    if os.path.islink(path):
        raise UnsafePathError(_symlink_message(Path(path)))


def _at(dir_fd: int) -> dict:
    return {"dir_fd": dir_fd} if _POSIX else {}


def _name(path: Path) -> str:
    """How to name `path` beside its directory's descriptor (Windows has none: the whole path)."""
    return path.name if _POSIX else str(path)


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _open_dir(path: Path, *, follow: bool) -> int:
    try:
        return os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC | (0 if follow else _NOFOLLOW))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise UnsafePathError(_symlink_message(path)) from exc
        raise


def _open_existing(path: Path, flags: int, dir_fd: int) -> int:
    try:
        return os.open(_name(path), flags & ~os.O_CREAT, FILE_MODE, **_at(dir_fd))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(_symlink_message(path)) from exc
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads (O_NONBLOCK) or a socket
            raise UnsafePathError(f"{path} is not a regular file; oisp writes only regular files") from exc
        raise


def _check_creatable(fd: int, existing: Path, target: Path, data_dir: bool) -> None:
    ids = invoking_user()
    if data_dir and ids is not None and os.fstat(fd).st_uid != ids[0]:
        raise UnsafePathError(
            f"cannot make the oisp data directory {target}: {existing} does not belong to uid {ids[0]} who ran "
            f"sudo (is something on the way a symbolic link?). Make it yourself (mkdir -m 700 -p {target}) "
            f"or point XDG_DATA_HOME at a directory you own")


def _make_child_dir(parent_fd: int, name: str, path: Path) -> int:
    try:
        os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
    except FileExistsError:
        pass  # made by a concurrent first run; it is opened without following below like any other
    fd = _open_dir_at(parent_fd, name, path)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid():  # ours: fix the mode the umask may have narrowed, hand it over
            _make_ours(fd, parent_fd, DIR_MODE)
    except BaseException:
        os.close(fd)
        raise
    os.close(parent_fd)
    return fd


def _open_dir_at(parent_fd: int, name: str, path: Path) -> int:
    try:
        return os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(_symlink_message(path)) from exc
        raise


def _make_ours(fd: int, dir_fd: int, mode: int) -> None:
    """Set the exact mode, and under sudo give what we made in the user's directory to the user."""
    if not _POSIX:
        return
    os.fchmod(fd, mode)
    ids = invoking_user()
    if ids is not None and os.fstat(dir_fd).st_uid == ids[0]:
        os.fchown(fd, *ids)


def _warn_if_shared(path: Path, st: os.stat_result, wanted: int) -> None:
    if not _POSIX or not stat.S_IMODE(st.st_mode) & 0o077 or str(path) in _warned:
        return
    _warned.add(str(path))
    print(f"oisp: warning: {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
          f"it may hold conversations or keys: chmod {wanted:o} {path}", file=sys.stderr)


def _symlink_message(path: Path) -> str:
    return (f"{path} is a symbolic link; oisp does not write or read its files through links (as root that "
            f"would hand the link's target to whoever made it). Replace it with a real "
            f"{'directory' if os.path.isdir(path) else 'file'} (rm {path}), or choose another path")

"""Where the IPC's bytes travel, and who is on the other end: the one seam between the
protocol and the operating system.

Linux (POSIX): a Unix domain stream socket in a directory root owns (0755: anyone may
look, only root may add or swap names in it), the socket itself 0660 (with a group) or
0600, owned by the allowed user, so the kernel refuses others' connect() before oisp
reads a byte. The server checks the peer's credentials as the kernel recorded them at
connect() (SO_PEERCRED: pid, uid, gid; not forgeable by the peer) against the policy,
and the client checks the server's the same way (a socket that is not root's is not the
redirector's).

Windows: a named pipe, \\\\.\\pipe\\oisp-…, with a DACL for SYSTEM, Administrators and the
allowed user, remote clients rejected, the client process checked with
GetNamedPipeClientProcessId (oisp.ipc.transport_windows; written to the documented
Win32 API, never run here).

The server's loop is per platform (oisp.ipc.serve_unix, oisp.ipc.transport_windows);
both hand oisp.ipc.server's sessions a Link (write / unsent / close, and the Peer), so
the protocol's handling is the same code on both. The client is asyncio on both.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ADDRESS = r"\\.\pipe\oisp-redirector" if sys.platform == "win32" else "/run/oisp/ipc.sock"
DIR_MODE = 0o755
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class TransportError(OSError):
    """The IPC endpoint cannot be made or trusted; the message says why and what to do."""


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, as the kernel knows it."""
    pid: int
    uid: int | None = None  # POSIX
    gid: int | None = None  # POSIX
    sid: str | None = None  # Windows: the client process's user SID

    def describe(self) -> str:
        who = f"uid {self.uid}" if self.uid is not None else f"sid {self.sid}"
        return f"pid {self.pid} ({who})"


@dataclass(frozen=True)
class AccessPolicy:
    """Who may connect: a peer whose uid (or Windows user SID) is listed, or whose
    effective gid at connect() is (so name a group only its members should have)."""
    uids: frozenset[int] = field(default_factory=frozenset)
    gids: frozenset[int] = field(default_factory=frozenset)
    sids: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def user(cls, uid: int, gid: int | None = None) -> AccessPolicy:
        return cls(uids=frozenset([uid]), gids=frozenset([gid]) if gid is not None else frozenset())

    def allows(self, peer: Peer) -> bool:
        return ((peer.uid is not None and peer.uid in self.uids)
                or (peer.gid is not None and peer.gid in self.gids)
                or (peer.sid is not None and peer.sid in self.sids))


def peer_credentials(sock: socket.socket) -> Peer:
    """SO_PEERCRED of a connected Unix socket: the peer's pid, uid and gid at connect().
    Linux only (other Unixes spell it differently): elsewhere it raises, and a server
    that cannot tell who connected refuses them."""
    if not hasattr(socket, "SO_PEERCRED"):
        raise OSError("SO_PEERCRED is not available on this system")
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid=pid, uid=uid, gid=gid)


# -- POSIX: the socket's directory and file ---------------------------------------------------
def prepare_socket_dir(path: Path) -> None:
    """Make (or check) the socket's directory: a real directory owned by us (root), 0755,
    not writable by group or others, in a parent that is not either, so nobody else can
    swap the socket for their own."""
    try:
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)  # whatever the umask
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise TransportError(f"{path} is not a directory (a link or a file): remove it and start again")
    if info.st_uid != os.geteuid():
        raise TransportError(f"{path} belongs to uid {info.st_uid}, not to the redirector's (uid {os.geteuid()}): "
                             f"remove it and start again")
    if info.st_mode & 0o022:
        os.chmod(path, DIR_MODE)
    parent = os.stat(path.parent)
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        raise TransportError(f"{path.parent} is writable by everyone: put the IPC socket in a directory root owns")


def listen_unix(path: str | os.PathLike[str], *, uid: int, gid: int | None = None, backlog: int = 16) -> socket.socket:
    """A listening socket at `path`, reachable only by `uid` (and group `gid` if given):
    bound under a temporary name, given its owner and mode, then renamed into place, so
    at no moment does `path` name a socket others could reach. A stale socket left by a
    dead redirector is replaced; a live one's is not taken over (TransportError)."""
    path = Path(path)
    prepare_socket_dir(path.parent)
    if _served(path):
        raise TransportError(f"another redirector already serves {path}: stop it first")
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temporary))
        os.chmod(temporary, 0o660 if gid is not None else 0o600)
        os.chown(temporary, uid, gid if gid is not None else -1)
        sock.listen(backlog)
        os.replace(temporary, path)
    except BaseException:
        sock.close()
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    sock.setblocking(False)
    return sock


def _served(path: Path) -> bool:
    """Whether a live server listens at `path` (a dead one's socket refuses connections)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


async def open_connection(address: str, protocol_factory) -> tuple[asyncio.BaseTransport, asyncio.Protocol, Peer]:
    """The client's side: connect to the server at `address`; returns the server's identity too."""
    loop = asyncio.get_running_loop()
    if sys.platform == "win32":
        from oisp.ipc import transport_windows

        return await transport_windows.open_connection(loop, address, protocol_factory)
    transport, protocol = await loop.create_unix_connection(protocol_factory, address)
    return transport, protocol, peer_credentials(transport.get_extra_info("socket"))

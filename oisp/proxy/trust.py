"""Making clients trust the oisp CA.

Two ways. Installing the CA in the system store covers clients that read it
(the httpx2-based SDKs, urllib, curl). Clients whose variable *replaces* their
store (SSL_CERT_FILE for httpx, REQUESTS_CA_BUNDLE for requests) need a file
holding the system roots plus our CA: pointing them at our CA alone would
break every other HTTPS site, the ones oisp passes through untouched included.
Node adds NODE_EXTRA_CA_CERTS to its own roots, so it gets our CA alone.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from oisp.proxy.ca import CertificateAuthority
from oisp.safefile import ensure_private_dir, write_replacing

BUNDLE_FILE = "ca-bundle.pem"
INSTALLED_NAME = "oisp.crt"  # Debian's update-ca-certificates only reads *.crt

EXIT_FAILED = 1
EXIT_NOT_PRIVILEGED = 3
EXIT_UNSUPPORTED = 4

PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----\s+[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"

# Where distributions keep the PEM bundle of their roots, after the path OpenSSL was built with.
DISTRO_BUNDLES = [
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, Alpine, the BSDs
]


class TrustError(Exception):
    """A trust operation that cannot be done here; `exit_code` tells scripts why."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class LinuxStore:
    anchors: Path  # the directory the update tool reads local CAs from
    update: tuple[str, ...]
    update_after_removal: tuple[str, ...]


# The first whose directory exists and whose tool is installed is used. Debian is what the tests exercise.
LINUX_STORES = [
    # Debian's update-ca-certificates drops a removed local CA from the bundle but leaves its symlinks in
    # /etc/ssl/certs dangling; --fresh rebuilds them.
    LinuxStore(Path("/usr/local/share/ca-certificates"), ("update-ca-certificates",),
               ("update-ca-certificates", "--fresh")),  # Debian, Ubuntu, Alpine
    LinuxStore(Path("/etc/pki/ca-trust/source/anchors"), ("update-ca-trust", "extract"),
               ("update-ca-trust", "extract")),  # Fedora, RHEL
    LinuxStore(Path("/etc/ca-certificates/trust-source/anchors"), ("update-ca-trust",),
               ("update-ca-trust",)),  # Arch
    LinuxStore(Path("/etc/pki/trust/anchors"), ("update-ca-certificates",),
               ("update-ca-certificates",)),  # openSUSE
]


def install(ca: CertificateAuthority) -> str:
    """Add the CA to the system store; returns what was done."""
    if sys.platform == "win32":
        _require_windows_admin("install")
        _run(["certutil", "-addstore", "-f", "Root", str(ca.cert_path)])
        return "added to the Windows machine Root store (certutil -addstore -f Root)"
    store = _linux_store()
    _require_root("install")
    target = store.anchors / INSTALLED_NAME
    # A public certificate: the update tools run as root but readers do not.
    write_replacing(target, ca.cert_pem.encode("ascii"), mode=0o644)
    _run(list(store.update))
    return f"copied to {target} and ran {' '.join(store.update)}"


def uninstall(ca: CertificateAuthority) -> str:
    """Remove the CA from the system store; returns what was done."""
    if sys.platform == "win32":
        _require_windows_admin("uninstall")
        serial = format(ca.certificate.serial_number, "x")
        _run(["certutil", "-delstore", "Root", serial])
        return f"removed serial {serial} from the Windows machine Root store (certutil -delstore Root)"
    store = _linux_store()
    _require_root("uninstall")
    target = store.anchors / INSTALLED_NAME
    if not target.exists():
        return f"not installed ({target} does not exist); nothing to do"
    target.unlink()
    _run(list(store.update_after_removal))
    return f"removed {target} and ran {' '.join(store.update_after_removal)}"


def system_roots() -> tuple[list[str], str]:
    """The system's trusted roots as PEM blocks, and where they came from."""
    # openssl_cafile, not cafile: cafile follows SSL_CERT_FILE, which may already point at our own bundle.
    candidates = [ssl.get_default_verify_paths().openssl_cafile, *DISTRO_BUNDLES]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            blocks = PEM_CERTIFICATE.findall(Path(candidate).read_text(encoding="ascii", errors="replace"))
            if blocks:
                return blocks, candidate
    if sys.platform == "win32":
        return _windows_roots(), "the Windows Root store"
    try:
        import certifi
    except ImportError:
        raise TrustError("found no system root bundle (looked at " + ", ".join(c for c in candidates if c) +
                         "); install your distribution's ca-certificates package, or `pip install certifi`",
                         EXIT_UNSUPPORTED) from None
    return PEM_CERTIFICATE.findall(Path(certifi.where()).read_text(encoding="ascii")), f"certifi ({certifi.where()})"


def write_bundle(ca: CertificateAuthority, path: Path | None = None) -> tuple[Path, int, str]:
    """Write the system roots plus our CA to `path` (default: beside the CA); returns the path, the
    number of certificates in it and where the roots came from."""
    path = Path(path) if path is not None else default_bundle_path(ca)
    roots, source = system_roots()
    ours = _normalized(ca.cert_pem)
    roots = [block for block in roots if _normalized(block) != ours]  # already there if installed system-wide
    text = "".join(block + "\n" for block in roots)
    text += f"# oisp CA, SHA-256 {ca.fingerprint_sha256}\n{ca.cert_pem}"
    ensure_private_dir(path.parent)
    write_replacing(path, text.encode("ascii"))
    return path, len(roots) + 1, source


def default_bundle_path(ca: CertificateAuthority) -> Path:
    return ca.cert_path.parent / BUNDLE_FILE


def env_lines(bundle: Path, ca_cert: Path, shell: str = "sh") -> list[str]:
    """Lines that point each client's variable at the right file, ready for eval (sh) or pasting (powershell)."""
    variables = {"SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle, "CURL_CA_BUNDLE": bundle,
                 "NODE_EXTRA_CA_CERTS": ca_cert}
    if shell == "sh":
        return ["export " + " ".join(f"{name}={shlex.quote(str(value))}" for name, value in variables.items())]
    if shell == "powershell":
        return [f"$env:{name} = '{str(value).replace(chr(39), chr(39) * 2)}'" for name, value in variables.items()]
    raise ValueError(f"unknown shell {shell!r}: sh or powershell")


def _normalized(pem: str) -> str:
    return "".join(pem.split())


def _windows_roots() -> list[str]:
    """Roots the Windows store trusts for server authentication (all purposes, or serverAuth named)."""
    return [ssl.DER_cert_to_PEM_cert(der).strip()
            for der, encoding, trust in ssl.enum_certificates("ROOT")  # type: ignore[attr-defined]
            if encoding == "x509_asn" and (trust is True or SERVER_AUTH in trust)]


def _linux_store() -> LinuxStore:
    if not sys.platform.startswith("linux"):
        raise TrustError(f"installing into the system store is not supported on {sys.platform}; trust "
                         "the certificate from `oisp ca path` by hand, or use `oisp ca env`", EXIT_UNSUPPORTED)
    for store in LINUX_STORES:
        if store.anchors.is_dir() and shutil.which(store.update[0]):
            return store
    known = "; ".join(f"{s.anchors} + {s.update[0]}" for s in LINUX_STORES)
    raise TrustError(f"found no supported system trust store (looked for {known}); install the "
                     "ca-certificates package, or use `oisp ca env`", EXIT_UNSUPPORTED)


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise TrustError(f"`oisp ca {action}` changes the system trust store and needs root: "
                         f"sudo oisp ca {action}", EXIT_NOT_PRIVILEGED)


def _require_windows_admin(action: str) -> None:
    import ctypes

    if not shutil.which("certutil"):
        raise TrustError("certutil is not on PATH (it ships with Windows in System32)", EXIT_UNSUPPORTED)
    if not ctypes.windll.shell32.IsUserAnAdmin():  # type: ignore[attr-defined]
        raise TrustError(f"`oisp ca {action}` changes the machine Root store and needs an Administrator "
                         "prompt", EXIT_NOT_PRIVILEGED)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise TrustError(f"{' '.join(command)} failed (exit {done.returncode}): "
                         f"{(done.stdout + done.stderr).strip()}")

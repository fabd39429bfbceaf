"""The per-install certificate authority that signs oisp's leaf certificates.

Made on first use and kept in the user's data directory: the certificate
beside a private key only its owner can read. The key is EC P-256: generating
it takes milliseconds instead of RSA's hundreds, every leaf signature is
cheaper, and every client oisp targets (OpenSSL, SChannel, Node, Go, curl)
accepts ECDSA roots. A CA that exists but cannot be read is an error that
names the file — never a silent new CA, which would break every client that
trusts the old one.
"""

from __future__ import annotations

import datetime
import getpass
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

# The data directory is shared with the event sinks; paths.py is a leaf module with no side effects.
from oisp.paths import data_dir
from oisp.safefile import ensure_private_dir, open_private, read_nofollow, refuse_link, write_replacing

CERT_FILE = "oisp-ca.pem"
KEY_FILE = "oisp-ca-key.pem"
VALIDITY = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(days=1)  # backdating, so a client whose clock runs slow still accepts it
CONCURRENT_CREATE_WAIT = 10.0  # seconds to wait for another process that is creating the CA right now


class CAError(Exception):
    """The CA on disk cannot be used; the message names the file and the way out."""


def ca_dir() -> Path:
    """Where the CA lives unless told otherwise."""
    return data_dir()


class CertificateAuthority:
    def __init__(self, certificate: x509.Certificate, private_key: CertificateIssuerPrivateKeyTypes,
                 cert_path: Path, key_path: Path) -> None:
        self.certificate = certificate
        self.private_key = private_key
        self.cert_path = cert_path
        self.key_path = key_path

    @classmethod
    def load_or_create(cls, directory: Path | None = None) -> CertificateAuthority:
        directory = Path(directory) if directory is not None else ca_dir()
        cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
        for path in (directory, cert_path, key_path):
            refuse_link(path)  # exists() below would follow one; opening never does
        if not cert_path.exists():
            if not key_path.exists():
                try:
                    return cls._create(cert_path, key_path)
                except FileExistsError:
                    pass  # another process made the key first; its certificate follows
            _wait_for_certificate(cert_path, key_path)
        return cls._load(cert_path, key_path)

    @property
    def cert_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def fingerprint_sha256(self) -> str:
        """Colon-separated upper-case hex, as `openssl x509 -fingerprint -sha256` and certutil show it."""
        return ":".join(f"{b:02X}" for b in self.certificate.fingerprint(hashes.SHA256()))

    @property
    def subject_key_identifier(self) -> x509.SubjectKeyIdentifier:
        return self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    @classmethod
    def _create(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        ensure_private_dir(cert_path.parent)
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _self_signed_ca(key)
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        write_replacing(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
        return cls(certificate, key, cert_path, key_path)

    @classmethod
    def _load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        try:
            certificate = x509.load_pem_x509_certificate(_read(cert_path, key_path))
        except ValueError as exc:
            raise CAError(_unusable(cert_path, f"is not a PEM certificate ({exc})")) from exc
        try:
            key = serialization.load_pem_private_key(_read(key_path, cert_path), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CAError(_unusable(key_path, f"is not an unencrypted PEM private key ({exc})")) from exc
        _check_is_ca(certificate, cert_path)
        public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*public) != certificate.public_key().public_bytes(*public):
            raise CAError(_unusable(key_path, f"is not the private key of {cert_path}"))
        return cls(certificate, key, cert_path, key_path)  # type: ignore[arg-type]  # the certificate's key, checked above


def _self_signed_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    host = (socket.gethostname() or "localhost")[:50]  # a CN is at most 64 characters
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"oisp CA ({host})"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "oisp"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, host),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        # path_length=0: this CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_private(path: Path, data: bytes) -> None:
    """Create the key file with owner-only access before a byte of the key is in it."""
    if sys.platform != "win32":
        fd = open_private(path, exclusive=True)  # 0600, not through a link, the user's under sudo
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_BINARY, 0o600)
        os.close(fd)  # the mode bits mean nothing on Windows: set an ACL on the still-empty file, then write
        _restrict_to_owner(path)
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _restrict_to_owner(path: Path) -> None:
    user = getpass.getuser()
    domain = os.environ.get("USERDOMAIN")
    account = f"{domain}\\{user}" if domain else user
    done = subprocess.run(["icacls", str(path), "/inheritance:r", "/grant:r", f"{account}:F"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        path.unlink()
        raise CAError(f"could not restrict {path} to {account} with icacls: {(done.stdout + done.stderr).strip()}")


def _wait_for_certificate(cert_path: Path, key_path: Path) -> None:
    """A key without a certificate is a CA being made right now, unless the key is older than that takes."""
    try:
        deadline = key_path.stat().st_mtime + CONCURRENT_CREATE_WAIT
    except FileNotFoundError:
        return
    while not cert_path.exists() and time.time() < deadline:
        time.sleep(0.05)


def _read(path: Path, other: Path) -> bytes:
    try:
        return read_nofollow(path)
    except FileNotFoundError as exc:
        raise CAError(_unusable(path, f"is missing while {other} exists")) from exc
    except PermissionError as exc:
        raise CAError(f"{path} cannot be read by this user ({exc.strerror}); it may belong to another user "
                      f"(made under sudo?). Run oisp as the user who made the CA, or see `oisp ca path`.") from exc


def _check_is_ca(certificate: x509.Certificate, cert_path: Path) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound as exc:
        raise CAError(_unusable(cert_path, f"lacks an extension a CA needs ({exc})")) from exc
    if not constraints.ca:
        raise CAError(_unusable(cert_path, "is not a CA certificate (basicConstraints CA:false)"))


def _unusable(path: Path, problem: str) -> str:
    return (f"the oisp CA file {path} {problem}. "
            f"`oisp ca path` shows where the CA lives. To make a new CA, delete both {path.parent / CERT_FILE} "
            f"and {path.parent / KEY_FILE}; every client that trusted the old CA must then trust the new one "
            f"(`oisp ca install`, `oisp ca bundle`).")

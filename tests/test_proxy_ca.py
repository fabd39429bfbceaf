"""The per-install CA: its extensions as openssl and cryptography read them, the key
file's mode, reloading, and the errors a damaged CA directory gives."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from oisp.proxy.ca import CERT_FILE, KEY_FILE, CAError, CertificateAuthority

needs_openssl = pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command")


@pytest.fixture
def ca(data_home) -> CertificateAuthority:
    return CertificateAuthority.load_or_create()


def test_made_in_the_user_data_directory(ca, data_home):
    assert ca.cert_path == data_home / CERT_FILE
    assert ca.key_path == data_home / KEY_FILE
    assert ca.cert_path.read_text() == ca.cert_pem


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_key_file_is_created_owner_only(data_home, monkeypatch):
    # With no umask help and chmod forbidden, 0600 can only come from the mode given at creation.
    def no_chmod(*args, **kwargs):
        raise AssertionError("the key file's mode must be set when it is created, not changed afterwards")

    monkeypatch.setattr(os, "chmod", no_chmod)
    old_umask = os.umask(0)
    try:
        ca = CertificateAuthority.load_or_create()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600


def test_extensions(ca):
    cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    ext = cert.extensions
    constraints = ext.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    assert not usage.value.key_encipherment
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject == cert.issuer
    names = " ".join(a.value for a in cert.subject)
    assert "oisp" in names
    assert socket.gethostname()[:50] in names
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "oisp"
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=3649) < lifetime <= datetime.timedelta(days=3650)
    cert.verify_directly_issued_by(cert)


def test_unique_per_install(tmp_path):
    first = CertificateAuthority.load_or_create(tmp_path / "one")
    second = CertificateAuthority.load_or_create(tmp_path / "two")
    assert first.fingerprint_sha256 != second.fingerprint_sha256
    assert first.certificate.serial_number != second.certificate.serial_number


def test_second_load_is_the_same_ca(ca):
    again = CertificateAuthority.load_or_create()
    assert again.fingerprint_sha256 == ca.fingerprint_sha256
    pkcs8 = serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    assert again.private_key.private_bytes(*pkcs8) == ca.private_key.private_bytes(*pkcs8)


def test_concurrent_first_runs_agree(tmp_path):
    found: list[str] = []
    errors: list[BaseException] = []

    def load():
        try:
            found.append(CertificateAuthority.load_or_create(tmp_path / "race").fingerprint_sha256)
        except BaseException as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(found)) == 1
    assert len(found) == 8


@needs_openssl
def test_openssl_reads_it_as_a_ca(ca):
    text = subprocess.run(["openssl", "x509", "-in", str(ca.cert_path), "-noout", "-text", "-fingerprint", "-sha256"],
                          capture_output=True, text=True, check=True).stdout
    assert "CA:TRUE" in text
    assert "Certificate Sign, CRL Sign" in text
    assert "Subject Key Identifier" in text
    assert f"Fingerprint={ca.fingerprint_sha256}" in text
    done = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(ca.cert_path), str(ca.cert_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    key_check = subprocess.run(["openssl", "pkey", "-in", str(ca.key_path), "-pubout"],
                               capture_output=True, text=True, check=True).stdout
    spki = ca.certificate.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert key_check == spki


def assert_clear_error(excinfo, path: Path) -> None:
    message = str(excinfo.value)
    assert str(path) in message
    assert "oisp ca path" in message
    assert "delete" in message


@pytest.mark.parametrize("damaged", [CERT_FILE, KEY_FILE])
def test_corrupt_file_is_a_clear_error_not_a_new_ca(ca, damaged):
    path = ca.cert_path.parent / damaged
    path.write_text("-----BEGIN GARBAGE-----\nnot base64 at all\n")
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    with pytest.raises(CAError) as excinfo:
        CertificateAuthority.load_or_create()
    assert_clear_error(excinfo, path)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_missing_key_is_a_clear_error(ca):
    ca.key_path.unlink()
    with pytest.raises(CAError) as excinfo:
        CertificateAuthority.load_or_create()
    assert_clear_error(excinfo, ca.key_path)
    assert not ca.key_path.exists()


def test_orphaned_key_is_a_clear_error(ca):
    ca.cert_path.unlink()
    os.utime(ca.key_path, (0, 0))  # an old key: nobody is making a CA right now
    with pytest.raises(CAError) as excinfo:
        CertificateAuthority.load_or_create()
    assert_clear_error(excinfo, ca.cert_path)


def test_key_of_another_ca_is_refused(ca, tmp_path):
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    shutil.copyfile(other.key_path, ca.key_path)
    with pytest.raises(CAError, match="is not the private key of") as excinfo:
        CertificateAuthority.load_or_create()
    assert_clear_error(excinfo, ca.key_path)


def test_a_certificate_that_is_not_a_ca_is_refused(ca):
    leaf = (x509.CertificateBuilder()
            .subject_name(ca.certificate.subject).issuer_name(ca.certificate.subject)
            .public_key(ca.private_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(ca.certificate.not_valid_before_utc).not_valid_after(ca.certificate.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca.private_key.public_key()), critical=False)
            .sign(ca.private_key, hashes.SHA256()))
    ca.cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CAError, match="not a CA") as excinfo:
        CertificateAuthority.load_or_create()
    assert_clear_error(excinfo, ca.cert_path)

"""Leaf certificates: their extensions, the chain as openssl and cryptography verify
it, the LRU bound, and real TLS handshakes on 127.0.0.1 from Python ssl, asyncio,
curl and httpx, each trusting only our CA."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from oisp.proxy.ca import CertificateAuthority
from oisp.proxy.certs import LeafIssuer, hostname_for_leaf
from tests.tls_server import HOST, TLSServer, pem
needs_openssl = pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command")
needs_curl = pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")


@pytest.fixture
def ca(data_home) -> CertificateAuthority:
    return CertificateAuthority.load_or_create()


@pytest.fixture
def issuer(ca) -> LeafIssuer:
    return LeafIssuer(ca)


def test_leaf_extensions(issuer, ca):
    leaf = issuer.certificate(HOST)
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [HOST]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == HOST
    assert leaf.issuer == ca.certificate.subject
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.subject_key_identifier.digest
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    # EC key: no key encipherment
    assert not usage.value.key_cert_sign
    assert not usage.value.key_encipherment
    constraints = ext.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs(leaf.not_valid_before_utc - (now - datetime.timedelta(days=1))) < datetime.timedelta(minutes=5)
    assert abs(leaf.not_valid_after_utc - (now + datetime.timedelta(days=365))) < datetime.timedelta(minutes=5)
    leaf.verify_directly_issued_by(ca.certificate)


def test_serials_are_random_and_the_leaf_key_is_shared(issuer):
    leaves = [issuer.certificate(f"host{i}.example.com") for i in range(20)]
    assert len({leaf.serial_number for leaf in leaves}) == 20
    assert all(0 < leaf.serial_number < 2**160 for leaf in leaves)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert len({leaf.public_key().public_bytes(*spki) for leaf in leaves}) == 1


@needs_openssl
@pytest.mark.parametrize("name", [HOST, "a" * 60 + "." + "b" * 60 + ".example.com", "under_score.example.com"])
def test_openssl_verifies_the_chain(issuer, ca, tmp_path, name):
    # The 125-character name has no CN, so its SAN is critical: openssl's strict mode checks that.
    (tmp_path / "leaf.pem").write_bytes(pem(issuer.certificate(name)))
    done = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-verify_hostname", name,
                           "-CAfile", str(ca.cert_path), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": OK" in done.stdout, done.stdout + done.stderr
    issuer.certificate(name).verify_directly_issued_by(ca.certificate)


@needs_openssl
def test_openssl_rejects_the_leaf_under_another_ca(issuer, tmp_path):
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    (tmp_path / "leaf.pem").write_bytes(pem(issuer.certificate(HOST)))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(other.cert_path), str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True)
    assert done.returncode != 0


@pytest.mark.parametrize("sni", ["", "127.0.0.1", "::1", "fe80::1", "10.0.0.1.", "999.1.1.1", "bad host", "a..b",
                                 "-lead.example.com", "x" * 64 + ".com", None])
def test_no_leaf_for_ips_empty_or_invalid_sni(issuer, sni):
    with pytest.raises(ValueError):
        issuer.certificate(sni)
    with pytest.raises(ValueError):
        issuer.server_context(sni, ["h2"])


def test_sni_is_case_and_trailing_dot_insensitive(issuer):
    assert hostname_for_leaf("API.OpenAI.com.") == HOST
    assert issuer.certificate("API.OpenAI.com.") is issuer.certificate(HOST)


def test_lru_bound_and_cache_hits(ca):
    issuer = LeafIssuer(ca, cache_size=1024)
    first = issuer.certificate("h0.example.com")
    assert issuer.certificate("h0.example.com") is first
    for i in range(1100):
        issuer.certificate(f"h{i}.example.com")
        assert len(issuer._certificates) <= 1024
    assert len(issuer._certificates) == 1024
    assert issuer.certificate("h1099.example.com") is issuer.certificate("h1099.example.com")
    assert issuer.certificate("h0.example.com").serial_number != first.serial_number  # evicted, issued again


def test_lru_keeps_recently_used(ca):
    issuer = LeafIssuer(ca, cache_size=3)
    kept = issuer.certificate("kept.example.com")
    for i in range(10):
        issuer.certificate(f"h{i}.example.com")
        assert issuer.certificate("kept.example.com") is kept


def test_concurrent_issue_gives_one_certificate(ca):
    issuer = LeafIssuer(ca)
    found: list[x509.Certificate] = []
    threads = [threading.Thread(target=lambda: found.append(issuer.certificate(HOST))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in found}) == 1


def test_contexts_are_cached_per_sni_and_alpn(issuer):
    h2 = issuer.server_context(HOST, ["h2"])
    assert issuer.server_context(HOST.upper(), ["h2"]) is h2
    assert issuer.server_context(HOST, ["http/1.1"]) is not h2
    assert issuer.server_context(HOST, None) is issuer.server_context(HOST, [])
    assert h2.minimum_version == ssl.TLSVersion.TLSv1_2


def test_key_touches_disk_only_in_a_private_temp_dir_that_is_removed(issuer, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    seen = []
    original = ssl.SSLContext.load_cert_chain

    def spy(self, certfile, *args, **kwargs):
        seen.append((stat.S_IMODE(Path(certfile).parent.stat().st_mode), stat.S_IMODE(Path(certfile).stat().st_mode)))
        return original(self, certfile, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    issuer.server_context(HOST, ["h2"])
    if sys.platform != "win32":
        assert seen == [(0o700, 0o600)]
    assert list((tmp_path / "tmp").iterdir()) == []


# --- real handshakes -------------------------------------------------------------------------------------------

def strict_client(cafile: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13+ sets this by default
    return context


def test_python_client_gets_h2_and_a_verified_chain(issuer, ca):
    with TLSServer(issuer.server_context(HOST, ["h2"])) as server:
        client = strict_client(ca.cert_path)
        client.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", server.port)) as raw, \
                client.wrap_socket(raw, server_hostname=HOST) as conn:
            assert conn.selected_alpn_protocol() == "h2"
            assert conn.version() in ("TLSv1.2", "TLSv1.3")
            peer = conn.getpeercert()
            assert ("DNS", HOST) in peer["subjectAltName"]
            chain = conn.getpeercert(binary_form=True)
            assert x509.load_der_x509_certificate(chain) == issuer.certificate(HOST)


def test_tls12_client_is_served(issuer, ca):
    with TLSServer(issuer.server_context(HOST, ["http/1.1"])) as server:
        client = strict_client(ca.cert_path)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", server.port)) as raw, \
                client.wrap_socket(raw, server_hostname=HOST) as conn:
            assert conn.version() == "TLSv1.2"


def test_client_without_our_ca_fails_verification(issuer):
    with TLSServer(issuer.server_context(HOST, ["h2"])) as server:
        client = strict_client(None)  # the system store only
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.wrap_socket(raw, server_hostname=HOST)


def test_wrong_hostname_fails_verification(issuer, ca):
    with TLSServer(issuer.server_context(HOST, ["h2"])) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                strict_client(ca.cert_path).wrap_socket(raw, server_hostname="api.anthropic.com")


def test_asyncio_server_and_client(issuer, ca):
    async def main() -> tuple[str | None, bytes]:
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=issuer.server_context(HOST, ["http/1.1"]))
        port = server.sockets[0].getsockname()[1]
        client = strict_client(ca.cert_path)
        client.set_alpn_protocols(["h2", "http/1.1"])
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=HOST)
            writer.write(b"GET / HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
            body = await reader.read()
            alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            writer.close()
            return alpn, body

    alpn, body = asyncio.run(main())
    assert alpn == "http/1.1"
    assert body.endswith(b"\r\n\r\nok")


@needs_curl
def test_curl_with_our_ca(issuer, ca):
    with TLSServer(issuer.server_context(HOST, ["http/1.1"])) as server:
        url = f"https://{HOST}:{server.port}/"
        resolve = f"{HOST}:{server.port}:127.0.0.1"
        done = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(ca.cert_path), "--resolve", resolve,
                               url], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "ok", done.stderr
        refused = subprocess.run(["curl", "-sS", "--max-time", "10", "--resolve", resolve, url],
                                 capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert refused.returncode == 60, refused.stderr  # 60: peer certificate cannot be authenticated


def test_httpx_with_our_ca(issuer, ca):
    httpx = pytest.importorskip("httpx")
    with TLSServer(issuer.server_context(HOST, ["http/1.1"])) as server:
        # httpx 0.28 deprecates verify=<path> in favour of this context, which loads the same file.
        transport = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(ca.cert_path)))
        with httpx.Client(transport=transport) as client:
            # httpx connects to the URL's host, so connect by address and name the host in SNI and Host.
            response = client.get(f"https://127.0.0.1:{server.port}/", headers={"Host": HOST},
                                  extensions={"sni_hostname": HOST})
        assert response.status_code == 200
        assert response.text == "ok"


def test_keylog_lines_for_the_client_side(ca, tmp_path):
    keylog = tmp_path / "keys.log"
    issuer = LeafIssuer(ca, keylog_filename=str(keylog))
    with TLSServer(issuer.server_context(HOST, ["h2"])) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as raw, \
                strict_client(ca.cert_path).wrap_socket(raw, server_hostname=HOST):
            pass
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in keylog.read_text() or "CLIENT_RANDOM" in keylog.read_text()

"""Leaf certificates for intercepted hosts, and server-side SSLContexts that present them.

One leaf per SNI hostname — never per IP address: a client that connected by
address sent no name, and a certificate for a bare IP would only teach it to
trust us for an address. One EC key serves every leaf, so issuing costs one
signature and no key generation. Certificates and contexts sit in bounded LRU
caches, so a client that walks many hostnames cannot grow memory without end.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Generic, Hashable, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from oisp.proxy.ca import CLOCK_SKEW, CertificateAuthority
from oisp.safefile import keylog_name

LEAF_VALIDITY = datetime.timedelta(days=365)
MAX_COMMON_NAME = 64  # longer names live in the SAN only
LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")  # underscores: real hosts use them, TLS stacks accept them

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def hostname_for_leaf(sni: str) -> str:
    """The SNI as a leaf certificate's name: lower case, no trailing dot; ValueError if not a hostname."""
    name = sni.rstrip(".").lower() if sni else ""
    if not name:
        raise ValueError("no SNI: leaf certificates are issued per hostname, and this client sent none")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"SNI {sni!r} is an IP address: leaf certificates are issued per hostname, never per IP")
    labels = name.split(".")
    if len(name) > 253 or not all(LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"SNI {sni!r} is not a DNS hostname")
    if labels[-1].isdigit():
        raise ValueError(f"SNI {sni!r} looks like an IP address (all-numeric last label), not a hostname")
    return name


class BoundedLRU(Generic[K, V]):
    """A thread-safe mapping that forgets its least recently used entry beyond `size`."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("an LRU cache needs room for at least one entry")
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def setdefault(self, key: K, value: V) -> V:
        """Store `value` unless another thread stored one first; return whichever is kept."""
        with self._lock:
            kept = self._items.setdefault(key, value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return kept

    def __len__(self) -> int:
        return len(self._items)


class LeafIssuer:
    def __init__(self, ca: CertificateAuthority, cache_size: int = 1024, keylog_filename: str | None = None) -> None:
        self.ca = ca
        # SSLKEYLOGFILE lines for the client side, for Wireshark. The name the contexts get is
        # checked and pinned to a file opened safely here (see keylog_name): TLS keys, 0600.
        self.keylog_filename = keylog_name(keylog_filename) if keylog_filename else None
        self.key = ec.generate_private_key(ec.SECP256R1())
        self._key_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca.subject_key_identifier)
        self._leaf_ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self._certificates: BoundedLRU[str, x509.Certificate] = BoundedLRU(cache_size)
        self._contexts: BoundedLRU[tuple[str, tuple[str, ...]], ssl.SSLContext] = BoundedLRU(cache_size)

    def certificate(self, sni: str) -> x509.Certificate:
        """The leaf for this hostname, issued on first use and cached."""
        name = hostname_for_leaf(sni)
        return self._certificates.get(name) or self._certificates.setdefault(name, self._issue(name))

    def server_context(self, sni: str, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A TLS ≥1.2 server context presenting the leaf for `sni` plus the CA, offering exactly `alpn`."""
        key = (hostname_for_leaf(sni), tuple(alpn or ()))
        return self._contexts.get(key) or self._contexts.setdefault(key, self._context(*key))

    def _issue(self, name: str) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        # An empty subject needs a critical SAN (RFC 5280 4.2.1.6); names too long for a CN get that.
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= MAX_COMMON_NAME else [])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca.certificate.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + LEAF_VALIDITY, self.ca.certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=not len(subject))
            .add_extension(self._aki, critical=False)
            .add_extension(self._leaf_ski, critical=False)
            .sign(self.ca.private_key, hashes.SHA256())
        )

    def _context(self, name: str, alpn: tuple[str, ...]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if alpn:
            context.set_alpn_protocols(list(alpn))
        if self.keylog_filename:
            context.keylog_filename = self.keylog_filename
        chain = self.certificate(name).public_bytes(serialization.Encoding.PEM) + self.ca.cert_pem.encode("ascii")
        # ssl loads a certificate and key only from a file: a 0700 directory that lives for this call alone.
        with tempfile.TemporaryDirectory(prefix="oisp-leaf-") as private_dir:
            path = Path(private_dir) / "leaf.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(chain + self._key_pem)
            context.load_cert_chain(path)
        return context

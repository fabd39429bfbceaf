"""ClientHello parsing against hellos produced by real TLS stacks (Python's ssl, and curl via a socket)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oisp.proxy.clienthello import NotTLS, hello_complete, parse_client_hello


def real_hello(sni: str | None, alpn: list[str] | None) -> bytes:
    """The bytes Python's ssl module (OpenSSL) sends first, captured through memory BIOs."""
    context = ssl.create_default_context()
    context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("sni, alpn", [
    ("api.openai.com", ["h2", "http/1.1"]),
    ("api.anthropic.com", ["http/1.1"]),
    ("example.org", None),
    (None, ["h2"]),
])
def test_sni_and_alpn_from_openssl_hello(sni, alpn):
    hello = real_hello(sni, alpn)
    assert hello_complete(hello) == len(hello)
    parsed = parse_client_hello(hello)
    assert parsed.sni == sni
    assert parsed.alpn == (alpn or [])


def test_incomplete_hello_asks_for_more():
    hello = real_hello("api.openai.com", ["h2"])
    for cut in range(len(hello)):
        assert hello_complete(hello[:cut]) is None


def test_hello_split_across_records():
    hello = real_hello("api.openai.com", ["h2", "http/1.1"])
    body = hello[5:]
    half = len(body) // 2
    split = b"\x16\x03\x01" + half.to_bytes(2, "big") + body[:half] + \
        b"\x16\x03\x01" + (len(body) - half).to_bytes(2, "big") + body[half:]
    assert hello_complete(split) == len(split)
    assert parse_client_hello(split).sni == "api.openai.com"


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x00\x00", b"\x17\x03\x03\x00\x10" + b"x" * 16])
def test_not_tls(data):
    with pytest.raises(NotTLS):
        hello_complete(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_crashes(data):
    framed = b"\x16\x03\x01" + len(data).to_bytes(2, "big") + data
    try:
        if hello_complete(framed) is not None:
            parse_client_hello(framed)
    except NotTLS:
        pass

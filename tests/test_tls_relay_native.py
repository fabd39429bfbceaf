"""oisp._native.tls_relay on its own: two TLS connections made in memory by Python's
ssl (an end and a relay side each), joined by `pump`. The reference is Python's own
SSLObject at each end: what one end wrote must be what pump returns as plaintext and
what the other end reads from pump's output."""

from __future__ import annotations

import random
import ssl

import pytest

from oisp._native import tls_relay
from tests.fakeprovider import HOSTS, make_test_pki
from tests.test_proxy_relay_tls import require_native


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    ca, cert, key = make_test_pki(tmp_path_factory.mktemp("tls-relay-pki"))
    serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serving.load_cert_chain(cert, key)
    return serving, ssl.create_default_context(cafile=ca)


class Conn:
    """A client and a server SSLObject over memory BIOs, handshaken."""

    def __init__(self, serving, trusting):
        self.bios = {name: (ssl.MemoryBIO(), ssl.MemoryBIO()) for name in ("client", "server")}
        self.client = trusting.wrap_bio(*self.bios["client"], server_hostname=HOSTS[0])
        self.server = serving.wrap_bio(*self.bios["server"], server_side=True)
        for _ in range(10):
            done = 0
            for tls in (self.client, self.server):
                try:
                    tls.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
                self.carry()
            if done == 2:
                return
        raise AssertionError("the in-memory handshake did not finish")

    def carry(self) -> None:
        """Move what each side wrote to the other's incoming BIO."""
        self.bios["server"][0].write(self.bios["client"][1].read())
        self.bios["client"][0].write(self.bios["server"][1].read())

    def wire_from(self, side: str) -> bytes:
        return self.bios[side][1].read()


def feed_and_read(tls: ssl.SSLObject, incoming: ssl.MemoryBIO, wire: bytes | None) -> bytes:
    if wire:
        incoming.write(wire)
    out = []
    try:
        while chunk := tls.read(1 << 16):
            out.append(chunk)
    except ssl.SSLWantReadError:
        pass
    return b"".join(out)


@pytest.fixture
def joined(contexts):
    """(end, relay side facing it, relay side facing upstream, upstream end): client end ->
    relay's server side ... relay's client side -> server end."""
    require_native()
    down, up = Conn(*contexts), Conn(*contexts)
    return down, up, tls_relay.handle(down.server), tls_relay.handle(up.client)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_pump_decrypts_reencrypts_and_returns_the_plaintext(joined, kind):
    down, up, relay_down, relay_up = joined
    payload = random.Random(5).randbytes(300_000)  # ~19 records, more than the scratch's first size
    for at in range(0, len(payload), 40_000):
        down.client.write(payload[at:at + 40_000])
    wire = down.wire_from("client")
    plain, back, out, status, error = tls_relay.pump(relay_down, kind(wire), relay_up)
    assert (status, error) == (tls_relay.OK, None)
    assert plain == payload
    assert feed_and_read(up.server, up.bios["server"][0], out) == payload


def test_a_record_split_anywhere_gives_its_plaintext_once_complete(joined):
    down, up, relay_down, relay_up = joined
    for i, cut in enumerate((1, 5, 6, 20, -1)):
        message = b"record %d" % i
        down.client.write(message)
        wire = down.wire_from("client")
        plain, _, out, status, _ = tls_relay.pump(relay_down, wire[:cut], relay_up)
        assert (plain, out, status) == (None, None, tls_relay.OK)  # not a whole record yet
        plain, _, out, status, _ = tls_relay.pump(relay_down, wire[cut:], relay_up)
        assert (plain, status) == (message, tls_relay.OK)
        assert feed_and_read(up.server, up.bios["server"][0], out) == message


def test_close_notify_ends_and_a_tampered_record_fails(joined):
    down, up, relay_down, relay_up = joined
    down.client.write(b"last")
    try:
        down.client.unwrap()
    except ssl.SSLWantReadError:
        pass  # close_notify written; the answer is not awaited
    plain, _, out, status, error = tls_relay.pump(relay_down, down.wire_from("client"), relay_up)
    assert (plain, status, error) == (b"last", tls_relay.ENDED, None)

    up.server.write(b"tampered")
    wire = bytearray(up.wire_from("server"))
    wire[-1] ^= 1  # the AEAD tag no longer matches
    plain, _, out, status, error = tls_relay.pump(relay_up, wire, relay_down)
    assert (plain, out, status) == (None, None, tls_relay.SRC_FAILED)
    assert error  # OpenSSL's reason, e.g. "... bad record mac" or "decryption failed"


def test_seal_encrypts_for_the_peer(joined):
    down, _, relay_down, _ = joined
    out, status, error = tls_relay.seal(relay_down, bytearray(b"from a plain side"))
    assert (status, error) == (tls_relay.OK, None)
    assert feed_and_read(down.client, down.bios["client"][0], out) == b"from a plain side"


def test_only_real_sslobjects_are_vouched_for(contexts):
    require_native()
    class Fake:
        _sslobj = object()

    assert tls_relay.handle(object()) is None
    assert tls_relay.handle(Fake()) is None
    assert tls_relay.handle(Conn(*contexts).client) is not None

"""The pinning policy (oisp/proxy/pinning.py): which clients pass through undecrypted."""

from __future__ import annotations

import ssl

from oisp.proxy.pinning import PinningPolicy, rejects_certificate

CURL, PY = ("/usr/bin/curl", "alice"), ("/usr/bin/python3", "alice")
SNI = "api.openai.com"


def test_one_rejection_does_not_pin_two_do():
    policy = PinningPolicy(rejections=2, ttl=600)
    assert not policy.rejected(CURL, SNI, 0.0)
    assert not policy.pinned(CURL, SNI, 1.0)
    assert not policy.may_be_pinned(SNI)
    assert policy.rejected(CURL, SNI, 2.0)
    assert policy.pinned(CURL, SNI, 3.0)
    assert policy.may_be_pinned(SNI)
    assert policy.active(3.0) == 1


def test_a_pin_is_per_program_user_and_name():
    policy = PinningPolicy(rejections=2)
    policy.rejected(CURL, SNI, 0.0)
    policy.rejected(CURL, SNI, 0.0)
    assert policy.pinned(CURL, SNI, 1.0)
    assert not policy.pinned(PY, SNI, 1.0)  # another program to the same host
    assert not policy.pinned(("/usr/bin/curl", "bob"), SNI, 1.0)  # the same program, another user
    assert not policy.pinned(CURL, "api.anthropic.com", 1.0)
    # Rejections of different programs do not add up.
    assert not policy.rejected(PY, "api.anthropic.com", 1.0)
    assert not policy.rejected(CURL, "api.anthropic.com", 1.0)
    assert not policy.pinned(PY, "api.anthropic.com", 1.0)
    assert not policy.pinned(CURL, "api.anthropic.com", 1.0)


def test_pins_and_rejections_expire():
    policy = PinningPolicy(rejections=2, ttl=10)
    policy.rejected(CURL, SNI, 0.0)
    assert not policy.rejected(CURL, SNI, 11.0)  # the first is too old to count
    assert policy.rejected(CURL, SNI, 12.0)
    assert policy.pinned(CURL, SNI, 21.9)
    assert not policy.pinned(CURL, SNI, 22.0)
    assert not policy.may_be_pinned(SNI)
    assert policy.active(22.0) == 0


def test_pins_and_pending_rejections_are_bounded():
    policy = PinningPolicy(rejections=2, ttl=600, limit=100)
    for i in range(1000):
        policy.rejected((f"/bin/p{i}", "u"), SNI, float(i))
        policy.rejected((f"/bin/p{i}", "u"), SNI, float(i))
        policy.rejected((f"/bin/q{i}", "u"), SNI, float(i))  # one rejection each: pending
    assert policy.active(1000.0) == 100
    assert len(policy._strikes) <= 100
    assert policy.pinned(("/bin/p999", "u"), SNI, 1000.0)
    assert not policy.pinned(("/bin/p0", "u"), SNI, 1000.0)
    assert policy._per_sni[SNI] == 100


def _client_alert(tmp_path, client: ssl.SSLContext, hostname: str = SNI) -> BaseException:
    """What our server side sees when a real OpenSSL client refuses its certificate."""
    from oisp.proxy.ca import CertificateAuthority
    from oisp.proxy.certs import LeafIssuer

    server = LeafIssuer(CertificateAuthority.load_or_create(tmp_path / "ca")).server_context(SNI)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    ours = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    side = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for tls, out, peer_in in ((ours, c_out, s_in), (side, s_out, c_in)):
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if tls is side:
                    return exc
            peer_in.write(out.read())
    raise AssertionError("the handshake did not fail")


def test_what_counts_as_a_certificate_rejection(tmp_path):
    untrusting = ssl.create_default_context()  # the system store: our CA is not in it
    assert rejects_certificate(_client_alert(tmp_path, untrusting))
    trusting = ssl.create_default_context(cafile=str(tmp_path / "ca" / "oisp-ca.pem"))
    assert rejects_certificate(_client_alert(tmp_path, trusting, hostname="not-the-leaf.example"))
    assert not rejects_certificate(ConnectionResetError("client closed during the TLS handshake"))
    assert not rejects_certificate(TimeoutError("client TLS handshake: no answer in 15 s"))
    wrong_version = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    wrong_version.reason = "WRONG_VERSION_NUMBER"
    assert not rejects_certificate(wrong_version)

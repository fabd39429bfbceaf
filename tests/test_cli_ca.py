"""`oisp ca`: path, show, bundle and env checked by the clients that read them (openssl,
Python ssl, httpx, bash's eval), and install/uninstall against this machine's real
Debian trust store, which the test leaves exactly as it found it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from oisp.cli import main
from oisp.proxy import trust
from oisp.proxy.ca import CertificateAuthority
from oisp.proxy.certs import LeafIssuer
from tests.tls_server import HOST, TLSServer, pem

REPO = Path(__file__).resolve().parent.parent
DEBIAN_ANCHORS = Path("/usr/local/share/ca-certificates")
DEBIAN_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# Some system roots carry a negative serial number, which cryptography parses with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")


def oisp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oisp", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=60)


def count_certificates(path: Path) -> int:
    return len(x509.load_pem_x509_certificates(path.read_bytes()))


@pytest.fixture
def ca(data_home) -> CertificateAuthority:
    return CertificateAuthority.load_or_create()


def test_path_makes_the_ca_and_prints_where_it_is(data_home, capsys):
    assert main(["ca", "path"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == data_home / "oisp-ca.pem"
    assert printed.is_file()
    assert main(["ca", "path"]) == 0
    assert Path(capsys.readouterr().out.strip()) == printed


def test_path_still_answers_when_the_ca_is_damaged_and_show_explains(ca, capsys):
    ca.key_path.write_text("garbage")
    assert main(["ca", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(ca.cert_path)
    assert main(["ca", "show"]) == 1
    err = capsys.readouterr().err
    assert str(ca.key_path) in err
    assert "oisp ca path" in err
    assert "delete" in err


def test_show(ca, capsys):
    assert main(["ca", "show"]) == 0
    out = capsys.readouterr().out
    assert ca.fingerprint_sha256 in out
    assert "O=oisp" in out
    assert str(ca.cert_path) in out
    assert "valid until: 20" in out
    assert "BEGIN CERTIFICATE" not in out
    assert main(["ca", "show", "--pem"]) == 0
    assert capsys.readouterr().out.endswith(ca.cert_pem)


def test_bare_ca_prints_usage(data_home, capsys):
    assert main(["ca"]) == 2
    assert "install" in capsys.readouterr().err


def test_bundle_is_the_system_roots_plus_our_ca(ca, tmp_path, capsys):
    assert main(["ca", "bundle"]) == 0
    bundle = Path(capsys.readouterr().out.strip())
    assert bundle == ca.cert_path.parent / "ca-bundle.pem"
    roots, source = trust.system_roots()
    system = {c for c in x509.load_pem_x509_certificates("\n".join(roots).encode())}
    inside = x509.load_pem_x509_certificates(bundle.read_bytes())
    assert len(system) > 20  # a real root store, not an empty file
    assert len(inside) == len(system) + 1
    assert set(inside) == system | {ca.certificate}
    if DEBIAN_BUNDLE.exists():
        assert count_certificates(bundle) == count_certificates(DEBIAN_BUNDLE) + (ca.cert_pem not in DEBIAN_BUNDLE.read_text())

    assert main(["ca", "bundle", "-o", str(tmp_path / "elsewhere.pem")]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "elsewhere.pem"
    assert (tmp_path / "elsewhere.pem").read_bytes() == bundle.read_bytes()


def test_bundle_ignores_an_ssl_cert_file_that_points_at_itself(ca, capsys, monkeypatch):
    assert main(["ca", "bundle"]) == 0
    bundle = Path(capsys.readouterr().out.strip())
    first = bundle.read_bytes()
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # as after eval "$(oisp ca env)"
    assert main(["ca", "bundle"]) == 0
    assert bundle.read_bytes() == first


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command")
def test_ssl_cert_file_bundle_trusts_our_leaf_and_the_system_roots(ca, tmp_path, capsys):
    assert main(["ca", "bundle"]) == 0
    bundle = Path(capsys.readouterr().out.strip())
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    only = {"SSL_CERT_FILE": str(bundle), "SSL_CERT_DIR": str(empty)}  # nothing but the bundle is trusted
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pem(LeafIssuer(ca).certificate(HOST)))
    roots = x509.load_pem_x509_certificates(bundle.read_bytes())[:-1]
    checked = [leaf]
    for i, root in enumerate(roots[:: max(1, len(roots) // 5)]):  # a handful of system roots, offline
        checked.append(tmp_path / f"root{i}.pem")
        checked[-1].write_bytes(pem(root))
    for path in checked:
        done = subprocess.run(["openssl", "verify", str(path)], capture_output=True, text=True,
                              env={**os.environ, **only})
        assert done.returncode == 0, done.stdout + done.stderr
    # Pointing SSL_CERT_FILE at our CA alone would lose the system roots: the reason the bundle exists.
    done = subprocess.run(["openssl", "verify", str(checked[1])], capture_output=True, text=True,
                          env={**os.environ, **only, "SSL_CERT_FILE": str(ca.cert_path)})
    assert done.returncode != 0

    # Python's ssl and httpx, whose SSL_CERT_FILE replaces their store, load all of it and verify our leaf.
    client = (
        "import ssl, sys, httpx\n"
        "ctx = ssl.create_default_context()\n"
        "print(len(ctx.get_ca_certs()))\n"
        "with httpx.Client() as c:\n"
        "    r = c.get(sys.argv[1], headers={'Host': sys.argv[2]}, extensions={'sni_hostname': sys.argv[2]})\n"
        "print(r.status_code, r.text)\n"
    )
    with TLSServer(LeafIssuer(ca).server_context(HOST, ["http/1.1"])) as server:
        done = subprocess.run([sys.executable, "-c", client, f"https://127.0.0.1:{server.port}/", HOST],
                              capture_output=True, text=True, env={**os.environ, **only}, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded, response = done.stdout.splitlines()
    assert int(loaded) == len(roots) + 1
    assert response == "200 ok"


def test_env_evals_in_bash_to_the_right_files(tmp_path):
    home = tmp_path / "it's a data home"  # a space and a quote: the output must be quoted for the shell
    env = {"XDG_DATA_HOME": str(home), "LOCALAPPDATA": str(home)}
    script = 'eval "$(%s -m oisp ca env)" && printf "%%s\\n" "$SSL_CERT_FILE" "$REQUESTS_CA_BUNDLE" ' \
             '"$CURL_CA_BUNDLE" "$NODE_EXTRA_CA_CERTS"' % sys.executable
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    bundle, requests_bundle, curl_bundle, node = done.stdout.splitlines()
    data = home / "oisp"
    assert bundle == requests_bundle == curl_bundle == str(data / "ca-bundle.pem")
    assert node == str(data / "oisp-ca.pem")
    assert count_certificates(Path(bundle)) > 20
    assert Path(node).read_text() in Path(bundle).read_text()


def test_env_for_powershell(ca, capsys):
    assert main(["ca", "env", "--shell", "powershell"]) == 0
    lines = capsys.readouterr().out.splitlines()
    bundle = ca.cert_path.parent / "ca-bundle.pem"
    assert lines == [f"$env:SSL_CERT_FILE = '{bundle}'", f"$env:REQUESTS_CA_BUNDLE = '{bundle}'",
                     f"$env:CURL_CA_BUNDLE = '{bundle}'", f"$env:NODE_EXTRA_CA_CERTS = '{ca.cert_path}'"]
    assert trust.env_lines(Path("C:/it's"), Path("C:/ca.pem"), "powershell")[0] == "$env:SSL_CERT_FILE = 'C:/it''s'"


@pytest.mark.skipif(sys.platform == "win32", reason="Linux store selection")
def test_install_needs_root(ca, monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["ca", "install"]) == trust.EXIT_NOT_PRIVILEGED
    assert "needs root" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="Linux store selection")
def test_no_trust_store_tool(ca, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trust, "LINUX_STORES", [trust.LinuxStore(tmp_path, ("oisp-no-such-update-tool",), ())])
    assert main(["ca", "install"]) == trust.EXIT_UNSUPPORTED
    assert "no supported system trust store" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() != 0, reason="needs root on Linux")
def test_failing_update_tool_is_reported(ca, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trust, "LINUX_STORES", [trust.LinuxStore(tmp_path, ("false",), ("false",))])
    assert main(["ca", "install"]) == trust.EXIT_FAILED
    assert "false failed (exit 1)" in capsys.readouterr().err
    assert main(["ca", "uninstall"]) == trust.EXIT_FAILED  # the file is removed, the update still fails
    assert not (tmp_path / "oisp.crt").exists()
    assert main(["ca", "uninstall"]) == 0
    assert "not installed" in capsys.readouterr().out


def store_state() -> tuple[str, list[str]]:
    return hashlib.sha256(DEBIAN_BUNDLE.read_bytes()).hexdigest(), sorted(os.listdir("/etc/ssl/certs"))


def openssl_verify_with_system_store(leaf: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    return subprocess.run(["openssl", "verify", "-CApath", "/etc/ssl/certs", str(leaf)],
                          capture_output=True, text=True, env=env)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("update-ca-certificates")
                         and DEBIAN_ANCHORS.is_dir() and shutil.which("openssl")),
                    reason="needs root, openssl and Debian's update-ca-certificates")
@pytest.mark.skipif((DEBIAN_ANCHORS / "oisp.crt").exists(), reason="an oisp CA is already installed; not touching it")
def test_install_and_uninstall_in_the_debian_store(ca, tmp_path):
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pem(LeafIssuer(ca).certificate(HOST)))
    before = store_state()
    assert openssl_verify_with_system_store(leaf).returncode != 0
    try:
        installed = oisp("ca", "install", env={"XDG_DATA_HOME": os.environ["XDG_DATA_HOME"]})
        assert installed.returncode == 0, installed.stderr
        assert (DEBIAN_ANCHORS / "oisp.crt").read_text() == ca.cert_pem
        assert oct((DEBIAN_ANCHORS / "oisp.crt").stat().st_mode & 0o777) == "0o644"
        done = openssl_verify_with_system_store(leaf)
        assert done.returncode == 0, done.stdout + done.stderr
        assert ca.cert_pem.strip() in DEBIAN_BUNDLE.read_text()

        removed = oisp("ca", "uninstall", env={"XDG_DATA_HOME": os.environ["XDG_DATA_HOME"]})
        assert removed.returncode == 0, removed.stderr
        assert openssl_verify_with_system_store(leaf).returncode != 0
        assert ca.cert_pem.strip() not in DEBIAN_BUNDLE.read_text()
    finally:
        if (DEBIAN_ANCHORS / "oisp.crt").exists():
            trust.uninstall(ca)
    assert store_state() == before

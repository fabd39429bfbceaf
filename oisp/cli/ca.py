"""`oisp ca`: where the interception CA is, what it is, and how clients come to trust it."""

from __future__ import annotations

import argparse
import sys

ACTIONS = {
    "path": "print the CA certificate's path",
    "show": "print the CA's subject, validity and SHA-256 fingerprint",
    "install": "add the CA to the system trust store (root / Administrator)",
    "uninstall": "remove the CA from the system trust store (root / Administrator)",
    "bundle": "write the system roots plus the CA to one PEM file",
    "env": "print the variables that point clients at the bundle, ready to eval",
}

EPILOG = """exit status: 0 done, 1 failed (a tool failed, the CA files are damaged), 2 usage,
3 needs root or Administrator, 4 not supported here (no trust store or tool found)

SSL_CERT_FILE, REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE replace a client's trust
store, so they must point at the bundle (system roots + CA), never at the CA
alone; NODE_EXTRA_CA_CERTS adds to Node's roots. Typical use:
  eval "$(oisp ca env)"                         (bash, zsh)
  oisp ca env --shell powershell | Invoke-Expression   (PowerShell)"""


def register(sub) -> None:
    parser = sub.add_parser("ca", help="the interception CA: path, show, install, uninstall, bundle, env",
                            description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="ca_action", metavar="ACTION")
    for name, help_text in ACTIONS.items():
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.set_defaults(func=run)
        if name == "show":
            action.add_argument("--pem", action="store_true", help="also print the certificate in PEM")
        if name == "bundle":
            action.add_argument("-o", "--output", metavar="FILE",
                                help="where to write it (default: ca-bundle.pem beside the CA)")
        if name == "env":
            action.add_argument("--shell", choices=["sh", "powershell"],
                                default="powershell" if sys.platform == "win32" else "sh",
                                help="syntax of the lines (default: %(default)s)")
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run(args) -> int:
    # Imported here, not at the top: `oisp --help` should not pay for loading cryptography.
    from oisp.proxy import trust
    from oisp.proxy.ca import CAError, CertificateAuthority

    if args.ca_action == "path":
        return _path()
    try:
        ca = CertificateAuthority.load_or_create()
        if args.ca_action == "show":
            _show(ca, args.pem)
        elif args.ca_action == "install":
            print(f"oisp ca install: {trust.install(ca)}")
        elif args.ca_action == "uninstall":
            print(f"oisp ca uninstall: {trust.uninstall(ca)}")
        elif args.ca_action == "bundle":
            path, count, source = trust.write_bundle(ca, args.output)
            print(f"oisp ca bundle: wrote {count} certificates (the roots from {source} plus the oisp CA) to:",
                  file=sys.stderr)
            print(path)
        elif args.ca_action == "env":
            bundle, _, _ = trust.write_bundle(ca)  # rewritten each time, so it follows updates of the system roots
            print("\n".join(trust.env_lines(bundle, ca.cert_path, args.shell)))
        return 0
    except CAError as exc:
        print(f"oisp ca: {exc}", file=sys.stderr)
        return trust.EXIT_FAILED
    except trust.TrustError as exc:
        print(f"oisp ca {args.ca_action}: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"oisp ca {args.ca_action}: {exc}", file=sys.stderr)
        return trust.EXIT_FAILED


def _path() -> int:
    """Printed without loading the CA, so a damaged one can still be found (CAError messages send users here)."""
    from oisp.proxy.ca import CERT_FILE, CAError, CertificateAuthority, ca_dir

    cert_path = ca_dir() / CERT_FILE
    status = 0
    if not cert_path.exists():  # first use: make the CA, so the path names a file
        try:
            CertificateAuthority.load_or_create()
        except (CAError, OSError) as exc:
            print(f"oisp ca path: could not create the CA: {exc}", file=sys.stderr)
            status = 1
    print(cert_path)
    return status


def _show(ca, pem: bool) -> None:
    cert = ca.certificate
    print(f"subject:     {cert.subject.rfc4514_string()}")
    print(f"valid from:  {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    print(f"valid until: {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    print(f"SHA-256:     {ca.fingerprint_sha256}")
    print(f"certificate: {ca.cert_path}")
    print(f"private key: {ca.key_path}")
    if pem:
        print(ca.cert_pem, end="")

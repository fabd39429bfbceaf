"""`oisp check`: what backend is here, which versions, which privileges, what is missing."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import sys

from oisp import __version__

LIBRARIES = ["pydivert", "numpy", "cffi", "cryptography", "psutil"]
COMPILED = ["oisp._native.packet_core", "oisp._native._divert_cffi"]


def register(sub) -> None:
    parser = sub.add_parser("check", help="show the backend, versions, privileges and what is missing")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--spec", metavar="FILE", help="the AI endpoint spec `oisp record --spec` would use")
    parser.set_defaults(func=run)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def watched(spec=None) -> dict:
    """What `oisp record` takes with this spec: HTTPS and QUIC to the AI providers'
    addresses, and plain HTTP to local model servers' ports on loopback and local networks."""
    from oisp.redirect.plain import LOCAL_NETWORKS
    from oisp.spec import load_spec

    spec = spec or load_spec()
    named = {p.id for p in spec.providers if p.hosts or p.host_patterns}
    local = [{"port": port, "provider": spec.provider_for(None, port).id} for port in spec.local_ports()]
    unported = sorted(p.id for p in spec.providers if not (p.hosts or p.host_patterns or p.ports))
    return {"https": {"port": 443, "providers": len(named), "hosts": len(spec.hosts()),
                      "host_patterns": len(spec.host_patterns())},
            "quic": "UDP 443 to the AI addresses is refused (clients fall back to TCP); --allow-quic lets it through",
            "plain": local, "plain_networks": [str(n) for n in LOCAL_NETWORKS],
            "plain_by_option": unported}


def gather(spec=None) -> dict:
    """Everything `oisp check` reports, as data."""
    from oisp.divert import preflight

    report: dict = {
        "oisp": __version__,
        "python": platform.python_version(),
        "platform": f"{sys.platform} {platform.machine()} {platform.release()}",
        "libraries": {name: _version(name) for name in LIBRARIES},
        "compiled": {},
        "backend": {},
        "privileges": {},
        "missing": [],
        "notes": [],
        "watched": watched(spec),
    }
    for module in COMPILED:
        try:
            importlib.import_module(module)
            report["compiled"][module] = "ok"
        except ImportError as exc:
            report["compiled"][module] = f"missing ({exc})"
            report["missing"].append({"what": module, "message": f"compiled module {module} is missing",
                                      "fix": "reinstall oisp: pip install --force-reinstall oisp"})
    _check_backend(report)
    if sys.platform == "win32":
        report["privileges"]["administrator"] = not preflight.check_privileges()
    else:
        report["privileges"]["euid"] = os.geteuid()
        report["privileges"]["capabilities"] = preflight.held_capabilities()
        report["privileges"]["btf"] = preflight.btf_available()
        report["privileges"]["cgroup2"] = preflight.cgroup2_mounted()
    for problem in preflight.check_privileges():
        report["missing"].append(vars(problem))
    for problem in preflight.check_layer(2) + preflight.check_fail_open():
        report["notes"].append(vars(problem))
    if not report["missing"]:
        _try_open(report)
    report["service"] = service_state()
    report["ready"] = not report["missing"]
    return report


def service_state() -> dict:
    """Whether `oisp service install` put the units in place, as whom, and what systemd
    (or on Windows the Service Control Manager) says of them. Reading it never fails the
    check: the service is one way of running oisp, not a requirement."""
    try:
        if sys.platform == "win32":
            from oisp.service import windows

            return windows.state()
        from oisp.service import systemd

        return systemd.state()
    except Exception as e:  # noqa: BLE001 - a broken systemctl or SCM must not hide the rest of the report
        return {"error": f"{type(e).__name__}: {e}", "installed": False, "units": {}}


def _check_backend(report: dict) -> None:
    from oisp.divert import pinned
    from oisp.divert.errors import DivertError

    backend = report["backend"]
    backend["name"] = pinned.backend_name()
    try:
        from oisp.divert.backend import get_backend

        loaded = get_backend()
        backend["library"] = str(loaded.location.path)
        backend["version"] = loaded.version()
    except (DivertError, OSError) as exc:
        report["missing"].append({"what": "backend", "message": str(exc), "fix": getattr(exc, "hint", "")})
        return
    try:
        expected_version, files = pinned.check_installed()
    except LookupError as exc:
        report["notes"].append({"what": "untested platform", "message": str(exc), "fix": ""})
        return
    backend["tested_version"] = expected_version
    backend["files"] = {str(f.path): "ok" if f.ok else f"sha256 {f.actual or 'missing'} != tested {f.expected}"
                        for f in files}
    if not all(f.ok for f in files):
        report["missing"].append({
            "what": "tested backend",
            "message": "the installed pydivert does not carry the backend files this oisp release was tested with",
            "fix": "pip install --force-reinstall 'pydivert==4.0.1'",
        })


def _try_open(report: dict) -> None:
    """With the privileges in place, prove a handle really opens (it matches nothing)."""
    from oisp.divert import DivertError, Handle

    try:
        Handle("false").close()
        report["backend"]["open"] = "ok"
    except DivertError as exc:
        report["backend"]["open"] = "failed"
        report["missing"].append({"what": "open", "message": exc.message, "fix": exc.hint})


def _print_text(report: dict) -> None:
    ok = lambda flag: "ok" if flag else "MISSING"  # noqa: E731
    print(f"oisp {report['oisp']}  Python {report['python']}  {report['platform']}")
    backend = report["backend"]
    print(f"backend      {backend.get('name')} {backend.get('version', '?')} (tested: {backend.get('tested_version', '?')})")
    if "library" in backend:
        print(f"  library    {backend['library']}")
    for path, state in backend.get("files", {}).items():
        print(f"  sha256     {state}  {os.path.basename(path)}")
    if "open" in backend:
        print(f"  open       {backend['open']}")
    print("libraries    " + "  ".join(f"{k} {v or 'MISSING'}" for k, v in report["libraries"].items()))
    print("compiled     " + "  ".join(f"{k.rsplit('.', 1)[1]} {v}" for k, v in report["compiled"].items()))
    privileges = report["privileges"]
    if "euid" in privileges:
        caps = ", ".join(privileges["capabilities"]) or "none"
        print(f"privileges   euid {privileges['euid']}; capabilities: {caps}")
        print(f"kernel       BTF {ok(privileges['btf'])}; cgroup2 at /sys/fs/cgroup {ok(privileges['cgroup2'])}")
    else:
        print(f"privileges   Administrator {ok(privileges['administrator'])}")
    w = report["watched"]
    print(f"watched      HTTPS :443 to {w['https']['providers']} providers ({w['https']['hosts']} hosts, "
          f"{w['https']['host_patterns']} host patterns); QUIC to them refused")
    print("  plain HTTP " + ", ".join(f":{p['port']} {p['provider']}" for p in w["plain"]))
    print(f"  on         {' '.join(w['plain_networks'])} (other hosts: oisp record --plain HOST:PORT)")
    if w["plain_by_option"]:
        print(f"  by option  {', '.join(w['plain_by_option'])}: oisp record --plain PORT=ID")
    _print_service(report["service"])
    for problem in report["missing"]:
        print(f"MISSING      {problem['message']}\n  fix:       {problem['fix']}")
    for note in report["notes"]:
        print(f"note         {note['message']}\n  fix:       {note['fix']}")
    print("ready" if report["ready"] else "NOT READY: fix what is MISSING above")


def _print_service(service: dict) -> None:
    from oisp.cli.service import describe

    if "error" in service:
        print(f"service      unknown: {service['error']}")
    elif not any(u["file"] for u in service["units"].values()):
        print("service      not installed (sudo oisp service install)")
    else:
        lines = describe(service)
        print("service      " + "\n             ".join(lines))


def run(args) -> int:
    from oisp.spec import load_spec

    try:
        spec = load_spec(args.spec) if args.spec else None
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:
        print(f"oisp check: {args.spec}: {e}", file=sys.stderr)
        return 2
    report = gather(spec)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0 if report["ready"] else 1

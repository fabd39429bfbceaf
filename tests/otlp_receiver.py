"""A real OTLP receiver for the tests: Datadog's ddapm-test-agent (PyPI), which accepts
OTLP traces, logs and metrics over HTTP and gRPC and gives back what arrived.

It pins an older opentelemetry-proto than our exporters need, so it lives in its own
virtual environment (.ci/run makes it): $OISP_OTLP_RECEIVER names its executable, else
/opt/oisp-otlp-receiver/bin/ddapm-test-agent, else the one on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT = "/opt/oisp-otlp-receiver/bin/ddapm-test-agent"


def executable() -> str | None:
    for candidate in (os.environ.get("OISP_OTLP_RECEIVER"), DEFAULT, shutil.which("ddapm-test-agent")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def value(v: dict[str, Any]) -> Any:
    """An OTLP AnyValue, as the receiver prints it in JSON, back to Python."""
    if not v:
        return None
    (kind, inner), = v.items()
    if kind == "int_value":
        return int(inner)
    if kind == "kvlist_value":
        return {kv["key"]: value(kv.get("value") or {}) for kv in inner.get("values", [])}
    if kind == "array_value":
        return [value(x) for x in inner.get("values", [])]
    return inner


def attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: value(kv.get("value") or {}) for kv in items or []}


class Receiver:
    """ddapm-test-agent on loopback ports of its own; ``wrap`` runs it elsewhere (a namespace)."""

    def __init__(self, wrap=lambda argv: argv) -> None:
        self.exe = executable()
        if self.exe is None:
            raise FileNotFoundError("ddapm-test-agent is not installed (see tests/otlp_receiver.py)")
        self.wrap = wrap
        self.apm_port, self.http_port, self.grpc_port = free_ports(3)
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def start(self, query=None) -> "Receiver":
        """``query``: how to ask it (in a namespace, a function running curl there)."""
        self.proc = subprocess.Popen(self.wrap([self.exe, "--port", str(self.apm_port), "--otlp-http-port",
                                                str(self.http_port), "--otlp-grpc-port", str(self.grpc_port)]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._query = query or self._local_query
        deadline = time.monotonic() + 30
        while True:
            try:
                self._query("/test/session/logs")
                return self
            except (OSError, ValueError, subprocess.SubprocessError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the OTLP receiver did not start ({self.proc.poll()})") from None
                time.sleep(0.2)

    def _local_query(self, path: str) -> Any:
        with urllib.request.urlopen(self.http_url + path, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def spans(self) -> list[dict[str, Any]]:
        """Every span received, each with its resource's attributes under "resource"."""
        out = []
        for request in self._query("/test/session/traces"):
            for rs in request.get("resource_spans", []):
                resource = attributes(rs.get("resource", {}).get("attributes"))
                for ss in rs.get("scope_spans", []):
                    for span in ss.get("spans", []):
                        out.append({**span, "attributes": attributes(span.get("attributes")), "resource": resource,
                                    "schema_url": ss.get("schema_url") or rs.get("schema_url")})
        return out

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for request in self._query("/test/session/logs"):
            for rl in request.get("resource_logs", []):
                resource = attributes(rl.get("resource", {}).get("attributes"))
                for sl in rl.get("scope_logs", []):
                    for rec in sl.get("log_records", []):
                        body = value(rec.get("body") or {})
                        out.append({**rec, "body": body, "event": json.loads(body) if isinstance(body, str) else None,
                                    "attributes": attributes(rec.get("attributes")), "resource": resource})
        return out

    def metrics(self) -> list[dict[str, Any]]:
        """Every metric of every export, in order (cumulative: the last of a name has the totals)."""
        out = []
        for request in self._query("/test/session/metrics"):
            for rm in request.get("resource_metrics", []):
                for sm in rm.get("scope_metrics", []):
                    out.extend(sm.get("metrics", []))
        return out

    def raw(self) -> str:
        """Everything received, as text (to look for what must not be there)."""
        return json.dumps([self._query(f"/test/session/{kind}") for kind in ("traces", "logs", "metrics")])

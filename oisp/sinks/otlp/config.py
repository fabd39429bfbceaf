"""Where the OTLP sink sends, and with which of the SDK's exporters.

The standard variables are honoured as the OpenTelemetry SDK defines them: the
exporters themselves read ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and the per-signal
``…_TRACES_ENDPOINT`` …), ``…_HEADERS``, ``…_TIMEOUT``, ``…_COMPRESSION`` and the
certificate variables; ``OTEL_EXPORTER_OTLP_PROTOCOL`` chooses between OTLP/HTTP
with protobuf (the default) and gRPC. A URL given to ``--otlp`` is a base URL, like
``OTEL_EXPORTER_OTLP_ENDPOINT``: /v1/traces, /v1/logs and /v1/metrics are added
for OTLP/HTTP. Headers usually hold a token and are never printed; of a URL only
scheme://host:port is.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from oisp.sinks.webhook import display_url

HTTP = "http/protobuf"
GRPC = "grpc"
PROTOCOLS = (HTTP, GRPC)
DEFAULT_ENDPOINTS = {HTTP: "http://localhost:4318", GRPC: "http://localhost:4317"}
CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"  # the GenAI instrumentations' opt-in


class OtlpConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    protocol: str
    base: str | None  # None: the exporters resolve the endpoint from the environment

    @property
    def shown(self) -> str:
        env = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return display_url(self.base or env or DEFAULT_ENDPOINTS[self.protocol])

    def host_port(self) -> tuple[str, int] | None:
        """The address a start-up reachability check connects to (the base endpoint's)."""
        url = self.base or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINTS[self.protocol]
        try:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            return (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)) if parts.hostname else None
        except ValueError:
            return None


def resolve(url: str | None, protocol: str | None) -> Endpoint:
    """``url``: from ``--otlp`` ("" or None: the environment's); ``protocol``: from ``--otlp-protocol``."""
    chosen = (protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or HTTP).strip().lower()
    if chosen not in PROTOCOLS:
        raise OtlpConfigError(f"OTLP protocol {chosen!r} is not supported (use {' or '.join(PROTOCOLS)})")
    if chosen == GRPC and importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
        raise OtlpConfigError("OTLP over gRPC needs the gRPC exporter: pip install 'oisp[grpc]'")
    base = (url or "").strip() or None
    if base is not None:
        try:
            parts = urlsplit(base)
        except ValueError:
            raise OtlpConfigError("the OTLP endpoint is not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OtlpConfigError(f"the OTLP endpoint must be an http:// or https:// URL, not {display_url(base)}")
    return Endpoint(chosen, base)


def content_opt_in(flag: bool) -> bool:
    return flag or os.environ.get(CONTENT_ENV, "").strip().lower() == "true"


def exporters(target: Endpoint):
    """(span, log, metric) exporters of the SDK for ``target``. Each export, its retries with
    exponential back-off included, is bounded by $OTEL_EXPORTER_OTLP_TIMEOUT (seconds, as
    the Python SDK reads it; default 10)."""
    if target.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        kw: dict = {}
        if target.base:
            kw.update(endpoint=target.base, insecure=target.base.startswith("http://"))
        return OTLPSpanExporter(**kw), OTLPLogExporter(**kw), OTLPMetricExporter(**kw)
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    def at(path: str) -> dict:
        return {"endpoint": f"{target.base.rstrip('/')}/v1/{path}"} if target.base else {}

    return OTLPSpanExporter(**at("traces")), OTLPLogExporter(**at("logs")), OTLPMetricExporter(**at("metrics"))

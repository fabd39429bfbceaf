"""The OTLP sink: spans (one per AI exchange, GenAI semantic conventions v1.41.0), log
records (the OISP events themselves) and metrics, exported with the OpenTelemetry SDK."""

from oisp.sinks.otlp.config import OtlpConfigError, Endpoint, resolve
from oisp.sinks.otlp.semconv import SEMCONV_VERSION
from oisp.sinks.otlp.exporter import OtlpExporter
from oisp.sinks.otlp.sink import OtlpSink

__all__ = ["OtlpConfigError", "OtlpExporter", "OtlpSink", "SEMCONV_VERSION", "Endpoint", "resolve"]

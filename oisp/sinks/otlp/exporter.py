"""The OTLP exporter: OISP events as OpenTelemetry spans, log records and metrics.

It runs in the OTLP sink's own process (oisp/sinks/otlp/child.py), so its CPU and its
hold on the GIL stay off the sensor's; tests also drive it in-process.
``emit`` and ``emit_many`` only queue the events, at most QUEUE of them (past it an
event is counted lost); a batch is one hand-off, which is how the exporter process
passes what one read of its pipe brought. One worker thread turns events into SDK
calls — a span opened at each ai.request and ended at its ai.response, one log
record per event, the GenAI metrics — and the SDK's batch processors and periodic
metric reader export from their own threads, with the exporters' retries and
back-off. The worker hands a span or a log record to its processor only while fewer
than the processor's queue length are still undelivered, so the SDK's own queue
never overflows unseen: what cannot go is dropped here and counted. Every export's
outcome is counted by a thin wrapper around the SDK's exporter. Every loss says why
in ``stats.last_error``.

``stats`` (a :class:`SinkStats`) counts OISP events, each of which is one log
record: emitted = delivered, lost = dropped or given up on; spans and metric
exports are counted beside them.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

from opentelemetry import trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry._logs import SeverityNumber

from oisp import __version__
from oisp.events.envelope import host_info
from oisp.sinks.base import SinkStats
from oisp.sinks.otlp import config, mapping
from oisp.sinks.otlp import semconv as sc

SCOPE = "oisp"
QUEUE = 10_000  # events waiting for the worker
# The SDK processors' queues: undelivered items the worker lets out at once. About two
# seconds of a lean lab's 1,100 exchanges/s (four log records each) ride out an endpoint's
# hiccup; 2,048 log records (half a second) were lost whenever the machine was busy.
SPAN_QUEUE = 2048
LOG_QUEUE = 8192
BATCH = 512  # items per export request: 512 log records are ~650 kB, under a 1 MiB request limit (ddapm-test-agent's)
SCHEDULE_MS = 1000  # a batch leaves at least this often (the SDK's default is 5 s)
METRIC_EXPORT_TIMEOUT_MS = 10_000
PENDING = 4096  # open spans (requests awaiting their response); past it the oldest is ended unanswered
PENDING_TTL = 1800.0  # seconds an unanswered request's span stays open
CONTENT_LIMIT = 65536  # characters of one content attribute (a long conversation is truncated)
CLOSE_TIMEOUT = 5.0
NO_RESPONSE = "no_response"  # error.type of a span whose response never came
_STOP = object()
# Why events were lost, as stats.last_error says it (the sensor prints it beside the count).
FULL = "the exporter's queue was full (events came faster than they could be exported)"
SDK_FULL = "the SDK's {} queue was full (the endpoint took the batches slower than they came)"
NOT_DELIVERED = "not delivered when the sink closed (the endpoint did not take them within the close timeout)"


@dataclass
class OtlpStats(SinkStats):
    spans_exported: int = 0
    spans_lost: int = 0
    metric_exports_failed: int = 0


class _Tally:
    """What one signal handed to its processor and what came of it."""

    def __init__(self) -> None:
        self.handed = self.ok = self.failed = 0

    @property
    def undelivered(self) -> int:
        return self.handed - self.ok - self.failed


class _CountingSpans(SpanExporter):
    def __init__(self, inner: SpanExporter, sink: "OtlpExporter") -> None:
        self.inner, self._sink = inner, sink

    def export(self, spans):
        result = self.inner.export(spans)
        self._sink._exported("spans", len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self):
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _CountingLogs(LogRecordExporter):
    def __init__(self, inner: LogRecordExporter, sink: "OtlpExporter") -> None:
        self.inner, self._sink = inner, sink

    def export(self, batch):
        result = self.inner.export(batch)
        self._sink._exported("logs", len(batch), getattr(result, "name", "") == "SUCCESS")
        return result

    def shutdown(self):
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _CountingMetrics(MetricExporter):
    def __init__(self, inner: MetricExporter, sink: "OtlpExporter") -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self.inner, self._sink = inner, sink

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
        result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        self._sink._exported("metrics", 1, result is MetricExportResult.SUCCESS)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class _LastError(logging.Handler):
    """The SDK's export warnings become the sink's last_error instead of lines on the
    sensor's terminal (where they would tear the status line, once per retry)."""

    def __init__(self, sink: "OtlpExporter") -> None:
        super().__init__(logging.WARNING)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call must not break export
            message = str(record.msg)
        with self._sink._lock:
            self._sink.stats.last_error = message[:300]
            self._sink._said = True


class _Resource(Resource):
    """A Resource that hashes once. The SDK's encoders group every span and log record by
    its resource, and Resource.__hash__ serialises the attributes to JSON each time (a few
    per cent of the exporter process's CPU); the attributes never change after start."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _resource() -> Resource:
    """service.name oisp and host.name; OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win."""
    base = Resource.create({"service.name": "oisp", "service.version": __version__,
                            "host.name": host_info()["hostname"], "os.type": host_info()["os"]},
                           schema_url=sc.SCHEMA_URL)
    return _Resource(base.merge(OTELResourceDetector().detect()))


class OtlpExporter:
    name = "otlp"

    def __init__(self, target: config.Endpoint, *, content: bool = False, exporters=None,
                 metric_interval_ms: float | None = None, notify: Callable[[str], None] | None = None) -> None:
        """``exporters``: (span, log, metric) exporters (default: the SDK's OTLP ones for
        ``target``); ``metric_interval_ms``: default $OTEL_METRIC_EXPORT_INTERVAL or 60 s;
        ``notify``: where the sink says that export failed or resumed (default stderr)."""
        self.target = target
        self.display_url = target.shown
        self.content = content
        self.stats = OtlpStats()
        self._notify = notify or (lambda text: print(f"oisp: {text}", file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._tallies = {"spans": _Tally(), "logs": _Tally()}
        self._failing: set[str] = set()  # signals whose last export failed
        self._health: dict[str, Any] = {}
        self._said = False  # the SDK logged a warning since the last export's outcome
        self._waiting: deque[Any] = deque()  # batches of (event, its JSON line or None) for the worker, and _STOP
        self._queued = 0  # events in them not yet handled (at most QUEUE)
        self._wake = threading.Event()
        self._pending: OrderedDict[str, tuple[Any, float, dict]] = OrderedDict()
        self._closed = False
        spans, logs, metrics = exporters or config.exporters(target)
        self._inner = (spans, logs, metrics)
        resource = _resource()
        self._tracer_provider = TracerProvider(resource=resource, span_limits=SpanLimits(max_attribute_length=CONTENT_LIMIT))
        self._tracer_provider.add_span_processor(BatchSpanProcessor(
            _CountingSpans(spans, self), max_queue_size=SPAN_QUEUE, max_export_batch_size=BATCH,
            schedule_delay_millis=SCHEDULE_MS))
        self._logger_provider = LoggerProvider(resource=resource)
        self._logger_provider.add_log_record_processor(BatchLogRecordProcessor(
            _CountingLogs(logs, self), max_queue_size=LOG_QUEUE, max_export_batch_size=BATCH,
            schedule_delay_millis=SCHEDULE_MS))
        reader = PeriodicExportingMetricReader(_CountingMetrics(metrics, self), export_interval_millis=metric_interval_ms,
                                               export_timeout_millis=METRIC_EXPORT_TIMEOUT_MS)
        # No exemplars: nothing is measured inside a span's context, and the filter would look for one each time.
        self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader],
                                             exemplar_filter=AlwaysOffExemplarFilter())
        self._tracer = self._tracer_provider.get_tracer(SCOPE, __version__, schema_url=sc.SCHEMA_URL)
        self._logger = self._logger_provider.get_logger(SCOPE, __version__, schema_url=sc.SCHEMA_URL)
        self._instruments(self._meter_provider.get_meter(SCOPE, __version__, schema_url=sc.SCHEMA_URL))
        self._log_handler = _LastError(self)
        self._sdk_loggers = [logging.getLogger(name) for name in ("opentelemetry.exporter", "opentelemetry.sdk")]
        self._propagate = [logger.propagate for logger in self._sdk_loggers]
        for logger in self._sdk_loggers:
            logger.addHandler(self._log_handler)
            logger.propagate = False
        self._thread = threading.Thread(target=self._run, name="oisp-otlp", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"OtlpExporter({self.target.protocol} {self.display_url})"

    # -- the capture side -------------------------------------------------------------------------

    def emit(self, event: dict[str, Any], line: bytes | None = None) -> None:
        self.emit_many([(event, line)])

    def emit_many(self, batch: list[tuple[dict[str, Any], bytes | None]]) -> None:
        """Queue events, each with the JSON line it was read from (its encode_event line: with
        content opted in, the log record's body as it is) or None."""
        with self._lock:
            room = QUEUE - self._queued
            if room < len(batch):
                self.stats.lost += len(batch) - max(0, room)
                self.stats.last_error = FULL
                batch = batch[:max(0, room)]
            self._queued += len(batch)
        if batch:
            self._waiting.append(batch)
            self._wake.set()

    def count_unreadable(self, count: int) -> None:
        """Lines the exporter process could not read as events (torn, or too long): lost."""
        with self._lock:
            self.stats.lost += count
            self.stats.errors += count
            self.stats.last_error = f"{count} unreadable line(s) from the sensor"

    def flush(self) -> None:
        """Nothing to do here: the processors send a batch at least every SCHEDULE_MS, and
        forcing one from the caller's thread would block capture on the network."""

    def set_health(self, health: dict[str, Any]) -> None:
        """The recorder's counters (flows, drops, sinks), read by the oisp.* metrics' callbacks."""
        self._health = health

    # -- the worker -------------------------------------------------------------------------------

    def _run(self) -> None:
        self._check_reachable()
        waiting, lock = self._waiting, self._lock
        stop = False
        while not stop:
            self._wake.wait(1.0)
            self._wake.clear()  # before taking: a batch queued from now on sets it again
            while waiting and not stop:
                batch = waiting.popleft()
                if batch is _STOP:
                    stop = True
                    break
                for event, line in batch:
                    try:
                        self._handle(event, line)
                    except Exception as e:  # noqa: BLE001 - one odd event costs itself, never the sink
                        with lock:
                            self.stats.lost += 1
                            self.stats.errors += 1
                            self.stats.last_error = f"{type(e).__name__}: {e}"
                    with lock:  # per event, so that close counts exactly what the worker did not get to
                        self._queued -= 1
            self._expire(time.monotonic())
        for rid in list(self._pending):
            self._end_unanswered(rid)

    def _check_reachable(self) -> None:
        address = self.target.host_port()
        if address is None:
            return
        try:
            socket.create_connection(address, timeout=1.0).close()
        except OSError as e:
            self._notify(f"warning: the OTLP endpoint {self.display_url} is not reachable now ({e.strerror or e}); "
                         f"recording goes on, and export starts when it answers")

    def _handle(self, event: dict[str, Any], line: bytes | None = None) -> None:
        kind = event.get("event_type")
        shown = event if self.content else mapping.without_content(event)
        span = None
        if kind == "ai.request":
            span = self._start(mapping.request_span(shown, content=self.content))
        elif kind == "ai.response":
            span = self._finish(shown)
        elif kind == "ai.streaming_chunk":
            open_ = self._pending.get(str((event.get("data") or {}).get("request_id")))
            span = open_[0] if open_ else None
        self._log(shown, span, line if self.content else None)

    def _start(self, start: mapping.SpanStart):
        if start.request_id in self._pending:  # the same id twice: the first is ended unanswered
            self._end_unanswered(start.request_id)
        span = self._tracer.start_span(start.name, kind=SpanKind.CLIENT, attributes=start.attributes,
                                       start_time=start.start_ns)
        self._pending[start.request_id] = (span, time.monotonic(), start.metric_attributes)
        if len(self._pending) > PENDING:
            self._end_unanswered(next(iter(self._pending)))
        return span

    def _finish(self, event: dict[str, Any]):
        end = mapping.response_span(event, content=self.content)
        open_ = self._pending.pop(end.request_id, None)
        if open_ is None:
            start = mapping.response_without_request(end, event)
            span = self._tracer.start_span(start.name, kind=SpanKind.CLIENT, attributes=start.attributes,
                                           start_time=start.start_ns)
            metric_attrs = start.metric_attributes
        else:
            span, _, metric_attrs = open_
        span.set_attributes(end.attributes)
        if end.error_type:
            span.set_status(Status(StatusCode.ERROR, end.error_type))
        self._end(span, end.end_ns)
        self._measure(end, metric_attrs)
        return span

    def _end(self, span, end_ns: int) -> None:
        """End the span (which hands it to the processor) only if the processor has room."""
        tally = self._tallies["spans"]
        with self._lock:
            room = tally.undelivered < SPAN_QUEUE
            if room:
                tally.handed += 1
            else:
                self.stats.spans_lost += 1
                self.stats.last_error = SDK_FULL.format("span")
        if room:
            span.end(end_time=end_ns)

    def _end_unanswered(self, request_id: str) -> None:
        span, _, _ = self._pending.pop(request_id)
        span.set_attribute(sc.ERROR_TYPE, NO_RESPONSE)
        span.set_status(Status(StatusCode.ERROR, NO_RESPONSE))
        self._end(span, time.time_ns())

    def _expire(self, now: float) -> None:
        while self._pending:
            rid, (_, opened, _) = next(iter(self._pending.items()))
            if now - opened < PENDING_TTL:
                break
            self._end_unanswered(rid)

    def _log(self, shown: dict[str, Any], span, line: bytes | None) -> None:
        """``line``: the event's JSON line when it is the body as it is (content opted in)."""
        # Everything that can fail on an odd event first: a record counted as handed must reach the processor.
        timestamp, text = mapping.timestamp_ns(shown["ts"]), mapping.body(shown, line)
        failed = shown.get("event_type") == "ai.response" and not (shown.get("data") or {}).get("success", True)
        tally = self._tallies["logs"]
        with self._lock:
            room = tally.undelivered < LOG_QUEUE
            if room:
                tally.handed += 1
            else:
                self.stats.lost += 1
                self.stats.last_error = SDK_FULL.format("log record")
        if not room:
            return
        self._logger.emit(timestamp=timestamp, observed_timestamp=time.time_ns(),
                          context=trace.set_span_in_context(span) if span is not None else None,
                          severity_number=SeverityNumber.WARN if failed else SeverityNumber.INFO,
                          severity_text="WARN" if failed else "INFO", body=text,
                          event_name=str(shown.get("event_type") or "oisp.event"))

    # -- metrics ----------------------------------------------------------------------------------

    def _instruments(self, meter) -> None:
        def histogram(spec, description):
            name, unit, buckets = spec
            return meter.create_histogram(name, unit=unit, description=description,
                                          explicit_bucket_boundaries_advisory=buckets)

        self._token_usage = histogram(sc.TOKEN_USAGE, "Number of input and output tokens used.")
        self._duration = histogram(sc.OPERATION_DURATION, "GenAI operation duration.")
        self._ttfc = histogram(sc.TIME_TO_FIRST_CHUNK, "Time to receive the first chunk in a streaming response.")
        self._cost = meter.create_counter("oisp.gen_ai.client.cost", unit="USD",
                                          description="Estimated cost of the calls, from oisp's price table.")
        meter.create_observable_counter("oisp.flows", callbacks=[self._observe_flows], unit="{flow}",
                                        description="Connections to AI endpoints, by what the sensor did with them.")
        meter.create_observable_counter("oisp.capture.dropped", callbacks=[self._observe_drops], unit="{packet}",
                                        description="Packets the capture engine dropped.")
        meter.create_observable_counter("oisp.sink.events", callbacks=[self._observe_sinks], unit="{event}",
                                        description="OISP events each sink delivered or lost.")

    def _measure(self, end: mapping.SpanEnd, attrs: dict[str, Any]) -> None:
        attrs = dict(attrs)
        if sc.RESPONSE_MODEL in end.attributes:
            attrs[sc.RESPONSE_MODEL] = end.attributes[sc.RESPONSE_MODEL]
        for kind, count in end.tokens.items():
            self._token_usage.record(count, {**attrs, sc.TOKEN_TYPE: kind})
        if end.duration_s is not None:
            self._duration.record(end.duration_s, {**attrs, sc.ERROR_TYPE: end.error_type} if end.error_type else attrs)
        if end.time_to_first_chunk_s is not None:
            self._ttfc.record(end.time_to_first_chunk_s, attrs)
        if end.cost_usd is not None:
            self._cost.add(end.cost_usd, attrs)

    def _observe_flows(self, _options):
        from opentelemetry.metrics import Observation

        if "flows" not in self._health:  # replay and decode intercept nothing: no figure rather than zeros
            return []
        flows = self._health["flows"]
        return [Observation(int(flows.get(k, 0)), {"oisp.flow.outcome": k}) for k in ("intercepted", "passed_through")]

    def _observe_drops(self, _options):
        from opentelemetry.metrics import Observation

        return [Observation(int(self._health.get("drops", 0)))] if "drops" in self._health else []

    def _observe_sinks(self, _options):
        from opentelemetry.metrics import Observation

        sinks = dict(self._health.get("sinks") or {})
        sinks[self.name] = vars(self.stats)
        return [Observation(int(stats.get(outcome, 0)), {"oisp.sink.name": name, "oisp.sink.outcome": outcome})
                for name, stats in sinks.items() for outcome in ("emitted", "lost")]

    # -- export outcomes (the SDK's export threads) -----------------------------------------------

    def _exported(self, signal: str, count: int, ok: bool) -> None:
        with self._lock:
            if signal == "metrics":
                if not ok:
                    self.stats.metric_exports_failed += 1
            else:
                tally = self._tallies[signal]
                if ok:
                    tally.ok += count
                else:
                    tally.failed += count
                if signal == "spans":
                    if ok:
                        self.stats.spans_exported += count
                    else:
                        self.stats.spans_lost += count
                elif ok:
                    self.stats.emitted += count
                else:
                    self.stats.lost += count
            if not ok:
                self.stats.errors += 1
                if not self._said:  # the SDK said nothing of why
                    self.stats.last_error = f"the endpoint refused or did not answer an export of {signal}"
            self._said = False
            was_failing = signal in self._failing
            (self._failing.discard if ok else self._failing.add)(signal)
        if not ok and not was_failing:
            self._notify(f"OTLP export of {signal} to {self.display_url} failing "
                         f"({self.stats.last_error or 'no answer'}); capture goes on, losses are counted")
        elif ok and was_failing:
            self._notify(f"OTLP export of {signal} to {self.display_url} resumed")

    # -- closing ----------------------------------------------------------------------------------

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Export what is queued, waiting at most ``timeout`` seconds; what has not been
        delivered by then is counted lost."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        self._waiting.append(_STOP)
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        remaining_ms = max(0.0, deadline - time.monotonic()) * 1000
        shutdown = threading.Thread(target=self._shutdown_providers, args=(remaining_ms,), name="oisp-otlp-close",
                                    daemon=True)
        shutdown.start()
        shutdown.join(max(0.0, deadline - time.monotonic()))
        if shutdown.is_alive():  # the endpoint is not answering: stop the retries and give up
            for exporter in self._inner:
                try:
                    exporter.shutdown()
                except Exception:  # noqa: BLE001
                    pass
            shutdown.join(1.0)
        with self._lock:
            left = self._queued  # never reached the worker
            self.stats.lost += left
            for signal, tally in self._tallies.items():
                given_up = tally.undelivered
                tally.failed += given_up
                if signal == "spans":
                    self.stats.spans_lost += given_up
                else:
                    self.stats.lost += given_up
                    left += given_up
            if left:
                self.stats.last_error = NOT_DELIVERED
            self.stats.spans_lost += len(self._pending)  # the worker did not get to end them
        for logger, propagate in zip(self._sdk_loggers, self._propagate):
            logger.removeHandler(self._log_handler)
            logger.propagate = propagate

    def _shutdown_providers(self, timeout_ms: float) -> None:
        self._tracer_provider.shutdown()
        self._logger_provider.shutdown()
        self._meter_provider.shutdown(timeout_millis=max(timeout_ms, 1.0))

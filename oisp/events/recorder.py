"""FlowRecorder: one connection's bytes in, redacted OISP events out — what the proxy drives.

It wraps :class:`oisp.decode.FlowDecoder`, turns its records into OISP events
(network.connect at the start, ai.request / ai.response per AI exchange,
optional ai.streaming_chunk, network.flow per HTTP exchange and per WebSocket
session — an AI request made over a WebSocket has no flow of its own), prices each
ai.response from a price table (``usage.cost``), attaches the attributed process
and runs redaction on each event before returning it.
"""

from __future__ import annotations

from typing import Any

from oisp.decode import Direction, FlowContext, FlowDecoder, RequestComplete, ResponseComplete, StreamDelta
from oisp.decode.ws_exchange import PROTOCOL as WEBSOCKET, SessionComplete
from oisp.events import builder, cost
from oisp.events.attribution import ProcessAttributor
from oisp.events.envelope import make_event
from oisp.events.redact import Redactor
from oisp.events.ulid import new_ulid
from oisp.spec import Spec, default_spec

EventDict = dict[str, Any]


class FlowRecorder:
    def __init__(
        self,
        ctx: FlowContext,
        *,
        spec: Spec | None = None,
        redactor: Redactor | None = None,
        attributor: ProcessAttributor | None = None,
        streaming_chunks: bool = False,
        capture_method: str = "mitm_proxy",
        all_http: bool = False,
        prices: cost.PriceTable | None = None,
    ) -> None:
        """``all_http``: emit network.flow for every HTTP exchange, not only AI ones.
        ``prices``: the table ai.response costs come from (default: the bundled one)."""
        self.ctx = ctx
        self.spec = spec or default_spec()
        self.decoder = FlowDecoder(ctx, self.spec)
        self.redactor = redactor or Redactor()
        self._streaming_chunks = streaming_chunks
        self._capture_method = capture_method
        self._all_http = all_http
        self._prices = prices or cost.bundled()
        self._process = (attributor or ProcessAttributor()).process(ctx.pid) if ctx.pid is not None else None
        if self._process is None and ctx.process_name:
            self._process = {"name": ctx.process_name}
        elif self._process is not None and ctx.process_name and "name" not in self._process:
            self._process["name"] = ctx.process_name
        self._request_ids: dict[int, str] = {}
        self._started = False

    @property
    def stats(self):
        return self.decoder.stats

    def start(self) -> list[EventDict]:
        """The network.connect event (also emitted by the first feed if not called)."""
        if self._started:
            return []
        self._started = True
        return [self._event("network.connect", builder.connect_data(self.ctx), self.ctx.start_ts)]

    def feed(self, direction: Direction, data: bytes, ts: float) -> list[EventDict]:
        return self.start() + self._convert(self.decoder.feed(direction, data, ts))

    def close(self, ts: float) -> list[EventDict]:
        return self.start() + self._convert(self.decoder.close(ts))

    def _convert(self, records: list) -> list[EventDict]:
        events: list[EventDict] = []
        for rec in records:
            if isinstance(rec, SessionComplete):
                events.append(self._event("network.flow", builder.websocket_flow_data(rec, self.ctx), rec.ts))
                continue
            ex = rec.exchange
            is_ai = ex.match is not None
            if isinstance(rec, RequestComplete) and is_ai:
                rid = self._request_ids.setdefault(ex.stream, new_ulid(ex.request_ts))
                events.append(self._ai_event("ai.request", builder.request_data(ex, self.ctx, self.spec, rid),
                                             ex.request_end_ts or ex.request_ts, ex))
            elif isinstance(rec, StreamDelta) and is_ai and self._streaming_chunks:
                rid = self._request_ids[ex.stream]
                events.append(self._ai_event("ai.streaming_chunk", builder.chunk_data(rid, rec.index, rec.delta), rec.ts, ex))
            elif isinstance(rec, ResponseComplete):
                end = ex.response_end_ts or ex.request_ts
                if is_ai:
                    rid = self._request_ids.pop(ex.stream)
                    data = builder.response_data(ex, self.ctx, rid)
                    cost.annotate(data, self._prices)
                    events.append(self._ai_event("ai.response", data, end, ex))
                if (is_ai or self._all_http) and ex.protocol != WEBSOCKET:
                    events.append(self._event("network.flow", builder.flow_data(ex, self.ctx), end))
        return events

    def _ai_event(self, event_type: str, data: dict[str, Any], ts: float, ex) -> EventDict:
        complete = (ex.complete or event_type != "ai.response") and "body_truncated" not in ex.problems
        reasons = ["tls_decrypted" if self.ctx.tls else "plaintext_capture", f"endpoint_{ex.match.detection}"]
        if "body_truncated" in ex.problems:
            reasons.append("body_truncated")  # decoded only up to the decoder's budget
        extra = {
            "content_source": "mitm_decryption" if self.ctx.tls else "plaintext_capture",
            "ai_detection_method": ex.match.detection,
            "process_attribution": "direct" if self.ctx.pid is not None else "unknown",
        }
        if ex.problems:
            extra["limitations"] = sorted(set(ex.problems))
        return self._event(event_type, data, ts, completeness="full" if complete else "partial", reasons=reasons, extra=extra)

    def _event(self, event_type: str, data: dict[str, Any], ts: float, *, completeness: str = "full", reasons=None,
               extra=None) -> EventDict:
        if self.ctx.pid is None:
            # Said outright: the sensor could not show which process held the connection
            # (it had closed, or no process held its socket), and names none rather than a guess.
            extra = dict(extra or {})
            extra["process_attribution"] = "unknown"
            extra["limitations"] = sorted({*extra.get("limitations", ()), "process_unknown"})
        ev = make_event(
            event_type,
            data,
            ts,
            process=dict(self._process) if self._process else None,
            capture_method=self._capture_method,
            completeness=completeness,
            reasons=reasons,
            extra_confidence=extra,
        )
        if self.ctx.flow_id:
            ev["attrs"] = {"flow_id": self.ctx.flow_id}
        return self.redactor.apply(ev)

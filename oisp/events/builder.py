"""Decoded exchanges → OISP event payloads (``data``), before envelope and redaction.

Credentials are handled here, at the source: an Authorization / x-api-key /
api-key / x-goog-api-key header or a ``key=`` query parameter becomes
``auth {type, key_prefix, key_hash}``; the key itself is never copied into an
event, and URLs are emitted without their query string.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import parse_qsl

from oisp.decode import Exchange, FlowContext
from oisp.decode.messages import header
from oisp.decode.ws_exchange import PROTOCOL as WEBSOCKET, SessionComplete
from oisp.events.envelope import make_event, rfc3339
from oisp.events.redact import secret_hash
from oisp.spec import Spec
from oisp.spec.model import split_host_port

_FINISH = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "complete": "stop", "eos": "stop", "finish_reason_unspecified": "other",
    "length": "length", "max_tokens": "length", "max_output_tokens": "length", "model_context_window_exceeded": "length",
    "tool_calls": "tool_calls", "tool_use": "tool_calls", "function_call": "tool_calls", "tool_call": "tool_calls",
    "content_filter": "content_filter", "safety": "content_filter", "recitation": "content_filter", "refusal": "content_filter",
    "blocklist": "content_filter", "prohibited_content": "content_filter", "spii": "content_filter", "guardrail_intervened": "content_filter",
    "error": "error", "error_toxic": "content_filter",
}
_KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")
_KEY_QUERY = ("key", "api_key", "api-key", "access_token")  # access_token: Gemini Live's ephemeral tokens


def finish_reason(raw: str | None) -> str | None:
    return None if raw is None else _FINISH.get(str(raw).lower(), "other")


def _ms(a: float | None, b: float | None) -> int | None:
    return None if a is None or b is None else max(0, round((b - a) * 1000))


def auth_info(ex: Exchange, spec: Spec) -> dict[str, Any]:
    secret, kind = None, "api_key"
    authz = header(ex.request_headers, "authorization")
    if authz:
        scheme, _, value = authz.partition(" ")
        scheme_l = scheme.lower()
        if scheme_l == "bearer":
            secret = value.strip()
            kind = "api_key" if spec.key_prefix(secret) and not secret.startswith("ya29.") and not secret.startswith("eyJ") else "oauth"
        elif scheme_l == "aws4-hmac-sha256":
            cred = value.split("Credential=", 1)[-1].split("/", 1)[0]
            secret, kind = cred.strip(), "api_key"
        else:
            secret, kind = authz.strip(), "unknown"
    for name in _KEY_HEADERS:
        if secret is None and header(ex.request_headers, name):
            secret = header(ex.request_headers, name)
    if secret is None:
        for k, v in parse_qsl(ex.query, keep_blank_values=False):
            if k.lower() in _KEY_QUERY:
                secret = v
                break
    if not secret:
        return {"type": "none"}
    return {"type": kind, "key_prefix": spec.key_prefix(secret), "key_hash": secret_hash(secret)}


def _websocket(ex: Exchange) -> bool:
    return ex.protocol == WEBSOCKET


def _endpoint(ex: Exchange, ctx: FlowContext) -> str:
    scheme = ("wss" if ctx.tls else "ws") if _websocket(ex) else "https" if ctx.tls else "http"
    return f"{scheme}://{ex.authority or ctx.server[0]}{ex.path}"


def provider_info(ex: Exchange, ctx: FlowContext) -> dict[str, Any]:
    m = ex.match
    assert m is not None
    return {"name": m.oisp_name, "id": m.provider_id, "endpoint": _endpoint(ex, ctx)}


def request_data(ex: Exchange, ctx: FlowContext, spec: Spec, request_id: str) -> dict[str, Any]:
    m, info = ex.match, ex.ai_request
    assert m is not None
    data: dict[str, Any] = {
        "request_id": request_id,
        "provider": provider_info(ex, ctx),
        "auth": auth_info(ex, spec),
        "request_type": m.request_type,
        "streaming": bool(info and info.streaming),
    }
    if info is None:
        return data
    if info.model:
        data["model"] = {"id": str(info.model)}
    messages = []
    for msg in info.messages:
        item: dict[str, Any] = {"role": msg.role, "content": msg.content, "content_length": len(msg.content)}
        if msg.image_count:
            item["has_images"], item["image_count"] = True, msg.image_count
        if msg.tool_call_id:
            item["tool_call_id"] = str(msg.tool_call_id)
        if msg.name:
            item["name"] = str(msg.name)
        messages.append(item)
    data["messages"] = messages
    data["messages_count"] = len(messages)
    data["has_system_prompt"] = any(msg.role == "system" for msg in info.messages)
    images = sum(msg.image_count for msg in info.messages)
    if images:
        data["has_images"], data["image_count"] = True, images
    if info.tools:
        data["tools"] = info.tools
    data["tools_count"] = len(info.tools)
    if info.tool_choice:
        data["tool_choice"] = str(info.tool_choice)
    if info.parameters:
        data["parameters"] = info.parameters
    return data


def response_data(ex: Exchange, ctx: FlowContext, request_id: str) -> dict[str, Any]:
    info = ex.ai_response
    status = ex.status or 0
    data: dict[str, Any] = {"request_id": request_id, "provider": provider_info(ex, ctx), "status_code": status}
    latency = _ms(ex.request_end_ts, ex.response_end_ts)
    if latency is not None:
        data["latency_ms"] = latency
    # Over a WebSocket the status is the upgrade's 101; what the response says decides success.
    ok_status = 200 <= status < 300 or (status == 101 and _websocket(ex))
    if info is None:
        data["success"] = ok_status and ex.complete
        return data
    error = dict(info.error) if info.error else None
    data["success"] = ok_status and ex.complete and error is None
    if error:
        data["error"] = error
    elif not data["success"]:
        data["error"] = {"type": "http_error" if status >= 400 else "incomplete", "message": f"HTTP {status}" if status and not ok_status else "no response"}
    if info.response_id:
        data["provider_request_id"] = str(info.response_id)
    model = info.model or (ex.ai_request.model if ex.ai_request else None)
    if model:
        data["model"] = {"id": str(model)}
    data["choices"] = [
        {k: v for k, v in (("index", c.index), ("message", {"role": "assistant", "content": c.text}), ("finish_reason", finish_reason(c.finish_reason))) if v is not None}
        for c in sorted(info.choices.values(), key=lambda c: c.index)
    ]
    data["tool_calls"] = [{k: v for k, v in (("id", tc.id), ("name", tc.name), ("type", tc.type), ("arguments", tc.arguments)) if v is not None} for tc in info.tool_calls]
    data["tool_calls_count"] = len(info.tool_calls)
    if info.thinking:
        data["thinking"] = info.thinking
    if info.usage:
        data["usage"] = dict(info.usage)
    ttft = _ms(ex.request_end_ts, info.first_token_ts)
    if ttft is not None and ex.ai_request is not None and ex.ai_request.streaming:
        data["time_to_first_token_ms"] = ttft
    fr = finish_reason(info.finish_reason)
    if fr:
        data["finish_reason"] = fr
    return data


def chunk_data(request_id: str, index: int, piece: dict[str, Any]) -> dict[str, Any]:
    delta = piece.get("delta") or {}
    out_delta: dict[str, Any] = {}
    if isinstance(delta.get("content"), str):
        out_delta["content"] = delta["content"]
    if isinstance(delta.get("role"), str):
        out_delta["role"] = delta["role"]
    if delta.get("tool_calls"):
        out_delta["tool_calls"] = [{k: v for k, v in tc.items() if isinstance(v, str)} for tc in delta["tool_calls"]]
    data: dict[str, Any] = {"request_id": request_id, "chunk_index": index, "delta": out_delta}
    fr = finish_reason(piece.get("finish_reason"))
    if fr:
        data["finish_reason"] = fr
    return data


def _endpoints(ctx: FlowContext) -> tuple[dict[str, Any], dict[str, Any]]:
    dest: dict[str, Any] = {"ip": ctx.server[0], "port": ctx.server[1]}
    if ctx.sni:
        dest["domain"] = ctx.sni
    return dest, {"ip": ctx.client[0], "port": ctx.client[1]}


def _domain(authority: str) -> str | None:
    """The name in a Host/:authority value, without its port ('localhost:11434' → 'localhost');
    None for an IP literal, which is no domain (dest.ip has it already)."""
    host, _ = split_host_port(authority)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host or None
    return None


def _tls(ctx: FlowContext) -> dict[str, Any] | None:
    if not ctx.tls:
        return None
    tls = {"version": ctx.tls_version, "cipher_suite": ctx.cipher, "sni": ctx.sni, "alpn": ctx.alpn}
    return {k: v for k, v in tls.items() if v}


def connect_data(ctx: FlowContext) -> dict[str, Any]:
    dest, src = _endpoints(ctx)
    data: dict[str, Any] = {"dest": dest, "src": src, "protocol": "tcp", "success": True}
    tls = _tls(ctx)
    if tls:
        data["tls"] = tls
    return data


def certificate_rejected_event(server: tuple[str, int], client: tuple[str, int], sni: str, ts: float, *,
                               reason: str, pid: int | None = None, process_name: str | None = None,
                               passes_for: float | None = None) -> dict[str, Any]:
    """The network.connect event of a client whose TLS handshake refused the interception
    certificate (`reason`: its alert), a sign that it pins its server. `passes_for`
    (seconds): the proxy now lets this program's connections to `sni` pass through
    undecrypted that long. No exchange was decoded, so the event is partial."""
    data = {"dest": {"ip": server[0], "port": server[1], "domain": sni}, "src": {"ip": client[0], "port": client[1]},
            "protocol": "tcp", "success": False, "tls": {"sni": sni}}
    process = {"pid": pid, **({"name": process_name} if process_name else {})} if pid else None
    why = f"client rejected the interception certificate ({reason})"
    if passes_for:
        why += f"; this program's connections to {sni} pass through undecrypted for {passes_for / 60:g} min"
    return make_event("network.connect", data, ts, process=process, completeness="partial", reasons=[why],
                      extra_confidence=None if process else {"process_attribution": "unknown",
                                                             "limitations": ["process_unknown"]})


def flow_data(ex: Exchange, ctx: FlowContext) -> dict[str, Any]:
    dest, src = _endpoints(ctx)
    if ex.authority and "domain" not in dest:
        name = _domain(ex.authority)
        if name:
            dest["domain"] = name
    http: dict[str, Any] = {"method": ex.method, "path": ex.path, "version": ex.protocol}
    if ex.status is not None:
        http["status_code"] = ex.status
    if ex.authority:
        http["host"] = ex.authority
    for key, name, headers in (("user_agent", "user-agent", ex.request_headers), ("content_type", "content-type", ex.response_headers)):
        value = header(headers, name)
        if value:
            http[key] = value
    end = ex.response_end_ts or ex.request_end_ts or ex.request_ts
    data: dict[str, Any] = {
        "dest": dest,
        "src": src,
        "protocol": "tcp",
        "direction": "outbound",
        "bytes_sent": ex.request_wire_bytes,
        "bytes_received": ex.response_wire_bytes,
        "duration_ms": _ms(ex.request_ts, end) or 0,
        "start_time": rfc3339(ex.request_ts),
        "end_time": rfc3339(end),
        "http": http,
    }
    tls = _tls(ctx)
    if tls:
        data["tls"] = tls
    return data


def websocket_flow_data(rec: SessionComplete, ctx: FlowContext) -> dict[str, Any]:
    """One WebSocket session: its upgrade (as an HTTP exchange) and what went over the socket."""
    ex, st = rec.exchange, rec.stats
    data = flow_data(ex, ctx)
    data["direction"] = "bidirectional"
    data["bytes_sent"] = ex.request_wire_bytes + st.client.wire_bytes
    data["bytes_received"] = ex.response_wire_bytes + st.server.wire_bytes
    data["duration_ms"] = _ms(ex.request_ts, rec.ts) or 0
    data["end_time"] = rfc3339(rec.ts)
    ws: dict[str, Any] = {"path": ex.path, "extensions": list(rec.session.extensions)}
    if rec.session.subprotocol:
        ws["subprotocol"] = rec.session.subprotocol
    for key, side in (("client", st.client), ("server", st.server)):
        ws[key] = {
            "messages": side.messages, "text_messages": side.text_messages, "binary_messages": side.binary_messages,
            "wire_bytes": side.wire_bytes, "payload_bytes": side.payload_bytes, "pings": side.pings, "pongs": side.pongs,
            "truncated_messages": side.truncated, "audio_bytes": side.audio_bytes,
        }
    if st.close_code is not None:
        ws["close_code"] = st.close_code
        ws["closed_by"] = st.closed_by
        if st.close_reason:
            ws["close_reason"] = st.close_reason
    ws["decode_errors"] = st.decode_errors
    data["websocket"] = ws
    return data

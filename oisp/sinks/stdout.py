"""Events to a terminal: one JSON object per line, or a short human-readable line."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from oisp.sinks.base import SinkStats

# Prompts, model names, paths and replies come from programs and providers: a terminal must
# not act on the control characters in them (OSC sets the title or writes the clipboard, CSI
# moves the cursor and clears the screen). C0 but newline and tab, DEL and C1 are shown escaped.
_CONTROLS = [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)]
_SHOWN = str.maketrans({c: f"\\x{c:02x}" for c in _CONTROLS})
# In JSON, C0 is escaped already; DEL and C1 get JSON's own escape, so the line stays valid JSON.
_JSON_SHOWN = str.maketrans({c: f"\\u{c:04x}" for c in _CONTROLS if c >= 0x7F})


def for_terminal(text: str) -> str:
    """`text` with every control character a terminal would act on shown escaped (\\x1b)."""
    return text.translate(_SHOWN)


def summary(event: dict[str, Any]) -> str:
    data, proc = event.get("data", {}), event.get("process") or {}
    who = f"{proc.get('name', '?')}[{proc.get('pid', '?')}]"
    head = f"{event.get('ts', '')[11:23]} {event.get('event_type', ''):<18} {who}"
    et = event.get("event_type")
    if et == "ai.request":
        n = data.get("messages_count", 0)
        return (f"{head} → {data.get('provider', {}).get('id')} {data.get('model', {}).get('id', '?')} "
                f"{n} msg{'s' if n != 1 else ''}{' stream' if data.get('streaming') else ''}")
    if et == "ai.response":
        u = data.get("usage", {})
        text = (data.get("choices") or [{}])[0].get("message", {}).get("content", "")
        text = text if isinstance(text, str) else "[redacted]"
        return (
            f"{head} ← {data.get('status_code')} {data.get('finish_reason', '-')} "
            f"in={u.get('prompt_tokens', '-')} out={u.get('completion_tokens', '-')} "
            f"{data.get('latency_ms', '-')}ms ttft={data.get('time_to_first_token_ms', '-')}ms {text[:60]!r}"
        )
    if et == "network.flow":
        h = data.get("http", {})
        return (f"{head} {h.get('method')} {h.get('host', '')}{h.get('path', '')} {h.get('status_code', '-')} "
                f"↑{data.get('bytes_sent')} ↓{data.get('bytes_received')}")
    if et == "network.connect":
        d = data.get("dest", {})
        return f"{head} {d.get('domain') or d.get('ip')}:{d.get('port')}"
    return f"{head} {json.dumps(data, ensure_ascii=False)[:100]}"


class StdoutSink:
    name = "stdout"

    def __init__(self, stream: TextIO | None = None, *, pretty: bool = False) -> None:
        self._stream = stream
        self.pretty = pretty
        self.stats = SinkStats()

    def emit(self, event: dict[str, Any]) -> None:
        stream = self._stream or sys.stdout
        if self.pretty:
            line = for_terminal(summary(event))
        else:
            line = json.dumps(event, ensure_ascii=False)
            if _is_terminal(stream):
                line = line.translate(_JSON_SHOWN)
        stream.write(line + "\n")
        self.stats.emitted += 1

    def flush(self) -> None:
        (self._stream or sys.stdout).flush()

    def close(self) -> None:
        self.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False

"""Where events go: a size-rotated JSONL file, stdout, an HTTP webhook.

Every sink has ``emit(event)``, ``flush()``, ``close()`` and ``stats``
(emitted / lost / errors). :class:`FanOut` drives several and isolates their failures.
"""

from oisp.sinks.base import FanOut, Sink, SinkStats
from oisp.sinks.jsonl import JsonlSink
from oisp.paths import data_dir, default_events_path
from oisp.sinks.stdout import StdoutSink
from oisp.sinks.webhook import WebhookSink

__all__ = ["FanOut", "JsonlSink", "Sink", "SinkStats", "StdoutSink", "WebhookSink", "data_dir", "default_events_path"]

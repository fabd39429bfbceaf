"""OISP events: the envelope, per-type JSON Schemas, process attribution, redaction,
and :class:`FlowRecorder`, which turns one connection's bytes into events."""

from oisp.events.attribution import ProcessAttributor
from oisp.events.envelope import OISP_VERSION, make_event, rfc3339
from oisp.events.recorder import EventDict, FlowRecorder
from oisp.events.redact import RedactionMode, Redactor
from oisp.events.schemas import EVENT_TYPES, load_schema

__all__ = [
    "EVENT_TYPES",
    "EventDict",
    "FlowRecorder",
    "OISP_VERSION",
    "ProcessAttributor",
    "RedactionMode",
    "Redactor",
    "load_schema",
    "make_event",
    "rfc3339",
]

"""Server-Sent Events per the WHATWG event-stream algorithm."""

from __future__ import annotations

import pytest

from oisp.decode.sse import SSEEvent, SSEParser


def parse(data: bytes, step: int | None = None) -> list[SSEEvent]:
    p = SSEParser()
    if step is None:
        return p.feed(data)
    return [e for i in range(0, len(data), step) for e in p.feed(data[i : i + step])]


def test_fields_comments_and_defaults() -> None:
    events = parse(b": comment\nevent: add\ndata: a\ndata:  b\nid: 7\nretry: 100\n\ndata\n\ndata: x\n\n")
    assert events == [SSEEvent("add", "a\n b", "7", 100), SSEEvent("message", "", "7", 100), SSEEvent("message", "x", "7", 100)]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_all_line_endings(eol: bytes) -> None:
    stream = eol.join([b"data: one", b"", b"data: two", b"", b""])
    for step in (None, 1, 2, 3):
        assert [e.data for e in parse(stream, step)] == ["one", "two"]


def test_bom_only_at_start_and_split() -> None:
    stream = b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n"
    assert [e.data for e in parse(stream, 1)] == ["a"]  # the second BOM makes an unknown field name


def test_no_data_no_dispatch_and_unterminated_event_dropped() -> None:
    assert parse(b"event: ping\n\ndata: tail") == []


def test_id_with_nul_ignored_and_bad_retry_ignored() -> None:
    (e,) = parse(b"id: a\x00b\nretry: 12x\ndata: z\n\n")
    assert e.id == ""
    assert e.retry is None


def test_utf8_split_across_chunks() -> None:
    data = "data: héllo 👋\n\n".encode()
    assert [e.data for e in parse(data, 1)] == ["héllo 👋"]


def test_field_without_space_and_colon_in_value() -> None:
    (e,) = parse(b"data:a: b\n\n")
    assert e.data == "a: b"

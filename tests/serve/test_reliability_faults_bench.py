"""How `tinyserve bench faults` classifies each request of the kill-under-load experiment."""

from __future__ import annotations

import json

from tinyserve.bench.faults import classify_stream

CHUNK = 'data: ' + json.dumps({"choices": [{"delta": {"content": "a"}, "finish_reason": None}]})
LAST = 'data: ' + json.dumps({"choices": [{"delta": {}, "finish_reason": "length"}]})
ERROR = 'data: ' + json.dumps({"error": {"message": "replica failed", "type": "ServiceUnavailableError", "code": 503}})
DONE = "data: [DONE]"


def test_whole_streams_are_ok_or_retried():
    assert classify_stream(200, 1, [CHUNK, "", LAST, DONE], None) == "ok"
    assert classify_stream(200, 2, [CHUNK, LAST, DONE], None) == "retried"


def test_a_stream_ended_by_an_error_event_is_cut():
    assert classify_stream(200, 1, [CHUNK, ERROR, DONE], None) == "cut"


def test_a_stream_that_stops_without_an_error_event_is_truncated():
    assert classify_stream(200, 1, [CHUNK, CHUNK], "RemoteProtocolError") == "truncated"
    assert classify_stream(200, 1, [CHUNK, DONE], None) == "truncated"  # [DONE] without a finish reason
    assert classify_stream(200, 1, [CHUNK, ERROR], None) == "truncated"  # an error event but no [DONE]


def test_http_errors_and_missing_answers():
    assert classify_stream(500, 0, [], None) == "failed_500"
    assert classify_stream(429, 0, [], None) == "failed_429"
    assert classify_stream(0, 0, [], "ConnectError") == "no_answer"

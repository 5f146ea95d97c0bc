"""The access line as JSON: whatever a client put in the path, the model name or the request ID, the line parses
back to what the request held."""

from __future__ import annotations

import io
import json

from service.http.access import AccessLog, RequestRecord


def test_a_json_access_line_parses_back_to_the_request_whatever_its_strings_hold() -> None:
    odd = 'a "quoted" \\ back\tslash, é, \u2603, \x07'
    scope = {
        "method": "POST",
        "path": f"/v2/models/{odd}/infer",
        "client": ("127.0.0.1", 50123),
        "headers": [(b"x-request-id", b'lb-"1"\\2'), (b"content-length", b"1234")],
    }
    record = RequestRecord.begin(scope)
    record.started -= 0.25  # a request that took a quarter of a second
    record.status, record.model, record.error, record.bytes_out = 404, odd, f"no model {odd}", 77
    stream = io.StringIO()
    AccessLog("json", stream=stream).write(record)
    [line] = stream.getvalue().splitlines()
    written = json.loads(line)
    assert written["path"] == scope["path"] and written["model"] == odd and written["error"] == f"no model {odd}"
    assert written["request_id"] == 'lb-"1"\\2' and written["client"] == "127.0.0.1:50123"
    assert (written["status"], written["bytes_in"], written["bytes_out"]) == (404, 1234, 77)
    assert written["images"] is None and written["trace_id"] is None and 250 <= written["latency_ms"] < 1250

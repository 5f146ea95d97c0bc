"""multipart/form-data bodies, parsed whole from bytes (the body is already read, under its size limit).

python-multipart's streaming parser, through Starlette's form(), cost a large share of a one-image request
(BENCHMARKS.md); this one splits on the boundary with bytes.find (C) and reads only each part's
Content-Disposition. It accepts what browsers, curl, httpx and requests send (RFC 7578) and refuses
anything else with a BadRequest that says what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.errors import BadRequest

# A parameter of a header value: name=token or name="quoted string" (\-escapes allowed).
_PARAM = re.compile(rb';\s*([A-Za-z0-9_*.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')
_BOUNDARY = re.compile(rb"^[0-9A-Za-z'()+_,\-./:=? ]{1,70}$")  # RFC 2046's bchars


@dataclass(frozen=True)
class Part:
    """One form field: its name, the file name when it is a file, and its bytes."""

    name: str
    filename: str | None
    data: bytes


def params(value: bytes) -> dict[bytes, bytes]:
    """`; key=value` parameters of a header value (keys lower-cased, quotes and escapes removed)."""
    found = {}
    for match in _PARAM.finditer(value):
        quoted, token = match.group(2), match.group(3)
        found[match.group(1).lower()] = re.sub(rb"\\(.)", rb"\1", quoted) if quoted is not None else token
    return found


def boundary_of(content_type: bytes) -> bytes:
    """The boundary of a `multipart/form-data; boundary=...` Content-Type, or a BadRequest."""
    media, _, rest = content_type.partition(b";")
    if media.strip().lower() != b"multipart/form-data":
        raise BadRequest("the body is not a multipart form")
    boundary = params(b";" + rest).get(b"boundary", b"")
    if not _BOUNDARY.match(boundary) or boundary.endswith(b" "):
        raise BadRequest("invalid multipart body: its Content-Type has no valid boundary")
    return boundary


def parse(body: bytes, content_type: bytes, max_parts: int) -> list[Part]:
    """The parts of a multipart/form-data body, in order; at most `max_parts` (more is a BadRequest)."""
    boundary = boundary_of(content_type)
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise BadRequest("invalid multipart body: the boundary from its Content-Type does not open it")
    parts: list[Part] = []
    position = start + len(delimiter)
    separator = b"\r\n" + delimiter
    while True:
        if body.startswith(b"--", position):  # the closing delimiter: the rest is an epilogue
            return parts
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise BadRequest("invalid multipart body: a delimiter line is malformed or the body ends too soon")
        headers_end = body.find(b"\r\n\r\n", line_end)  # line_end itself for a part without headers
        if headers_end < 0:
            raise BadRequest("invalid multipart body: a part's headers do not end")
        data_end = body.find(separator, headers_end + 4)
        if data_end < 0:
            raise BadRequest("invalid multipart body: it ends before its closing boundary")
        if len(parts) == max_parts:
            raise BadRequest(f"invalid multipart body: more than {max_parts} parts")
        parts.append(_part(body[line_end + 2 : headers_end], body[headers_end + 4 : data_end]))
        position = data_end + len(separator)


def _part(headers: bytes, data: bytes) -> Part:
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            disposition = params(b";" + value.split(b";", 1)[1]) if b";" in value else {}
            if value.split(b";", 1)[0].strip().lower() != b"form-data" or b"name" not in disposition:
                break
            filename = disposition.get(b"filename")
            name = disposition[b"name"].decode("utf-8", "replace")
            return Part(name, None if filename is None else filename.decode("utf-8", "replace"), data)
    raise BadRequest("invalid multipart body: a part has no Content-Disposition: form-data with a name")

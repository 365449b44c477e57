"""multipart/form-data (RFC 7578, RFC 2046 section 5.1) for bodies already read whole.

The service reads an upload's body at once (its size is capped by the body-size middleware before
a byte is read), so a streaming parser buys nothing here and costs a Python callback per header
field: Starlette's form parser was a large share of POST /encode's time with one small PNG
(docs/benchmarks.md).
This one finds the delimiters with ``bytes.find`` and hands back the parts as they are.

    parts = parse(body, boundary(content_type_header), max_parts=80)

Errors are :class:`MultipartError` (a malformed body: the caller answers 400) and its subclass
:class:`TooManyPartsError` (more parts than allowed: 413).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

# RFC 2046: 1 to 70 characters from this set, the last not a space.
_BOUNDARY = re.compile(rb"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
# A parameter of a header value: name=token or name="quoted string" (with backslash escapes).
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_ESCAPE = re.compile(r"\\(.)")
# RFC 8187 (which RFC 7578 points to for filename*): UTF-8 and ISO-8859-1 only. Any other codec name that
# Python knows (idna, utf-7, raw_unicode_escape, rot13...) could raise or yield text that is no valid
# Unicode (lone surrogates), so an extended parameter in another charset is ignored, not decoded.
_CHARSETS = {"utf-8": "utf-8", "iso-8859-1": "latin-1", "us-ascii": "ascii", "": "utf-8"}


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data; the message says where."""


class TooManyPartsError(MultipartError):
    def __init__(self, limit: int):
        super().__init__(f"more than {limit} parts in the multipart body")
        self.limit = limit


@dataclass(frozen=True)
class Part:
    name: str | None  # Content-Disposition name
    filename: str | None  # Content-Disposition filename (None: a text field)
    content_type: str | None
    data: bytes


def params(value: str) -> dict[str, str]:
    """The parameters of a header value (``form-data; name="a"; filename="b.png"``), names lower-cased.

    ``filename*=utf-8''...`` (RFC 5987) is decoded and takes precedence over ``filename``.
    """
    out: dict[str, str] = {}
    extended = False
    for key, raw in _PARAM.findall(value):
        key = key.lower()
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
            raw = raw[1:-1]
            if "\\" in raw:
                raw = _ESCAPE.sub(r"\1", raw)
        if key[-1] == "*":
            extended = True
            charset, _, rest = raw.partition("'")
            _, _, encoded = rest.partition("'")
            encoding = _CHARSETS.get(charset.strip().lower())
            try:
                if encoding is None:
                    raise LookupError(charset)
                out[key[:-1]] = unquote(encoded, encoding=encoding, errors="strict")
            except (LookupError, UnicodeDecodeError):
                # Another charset than RFC 8187's, or undecodable: the plain parameter wins if there is one;
                # else the parameter is there, with an empty value (a file part whose name is unknown)
                out.setdefault(key[:-1], "")
                continue
            out[key] = "*"  # mark that the extended value won
        elif key + "*" not in out:
            out[key] = raw
    return {k: v for k, v in out.items() if not k.endswith("*")} if extended else out


def boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data; boundary=...`` Content-Type header."""
    value = params(content_type).get("boundary")
    if not value:
        raise MultipartError("the Content-Type header has no boundary parameter")
    b = value.encode("latin-1", errors="replace")
    if not _BOUNDARY.match(b):
        raise MultipartError(f"invalid boundary {value[:80]!r} (1 to 70 characters, RFC 2046)")
    return b


def _headers(block: bytes, index: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise MultipartError(f"part {index}: malformed header line {line[:80]!r}")
        # RFC 7578 allows UTF-8 in field values (file names); fall back to latin-1 byte by byte.
        try:
            text = value.strip().decode("utf-8")
        except UnicodeDecodeError:
            text = value.strip().decode("latin-1")
        headers[name.strip().decode("latin-1").lower()] = text
    return headers


def parse(body: bytes, boundary: bytes, *, max_parts: int) -> list[Part]:
    """The parts of a whole multipart body, in order; :class:`MultipartError` if it is malformed."""
    delim = b"--" + boundary
    if body.startswith(delim):
        pos = len(delim)
    else:  # a preamble before the first delimiter (RFC 2046: to be ignored)
        start = body.find(b"\r\n" + delim)
        if start < 0:
            raise MultipartError("the body does not contain the boundary of its Content-Type header")
        pos = start + 2 + len(delim)
    sep = b"\r\n" + delim
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):  # the close delimiter; what follows is an epilogue
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):  # only transport padding may follow a delimiter
            raise MultipartError(f"part {len(parts)}: expected a line break after the boundary")
        if len(parts) >= max_parts:
            raise TooManyPartsError(max_parts)
        pos = eol + 2
        if body.startswith(b"\r\n", pos):  # no headers
            block, content = b"", pos + 2
        else:
            end = body.find(b"\r\n\r\n", pos)
            if end < 0:
                raise MultipartError(f"part {len(parts)}: its headers do not end (expected an empty line)")
            block, content = body[pos:end], end + 4
        nxt = body.find(sep, content)
        if nxt < 0:
            raise MultipartError(f"part {len(parts)}: no boundary after it (truncated body?)")
        headers = _headers(block, len(parts)) if block else {}
        disposition = headers.get("content-disposition")
        if disposition is None or not disposition.lower().startswith("form-data"):
            raise MultipartError(f"part {len(parts)}: expected a Content-Disposition: form-data header")
        p = params(disposition)
        parts.append(Part(name=p.get("name"), filename=p.get("filename"),
                          content_type=headers.get("content-type"), data=body[content:nxt]))
        pos = nxt + len(sep)
        if pos >= len(body):
            raise MultipartError("the body ends without the closing boundary (--boundary--)")

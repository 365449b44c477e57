"""Request bodies as clients write them: the one multipart/form-data builder of the tests, benches and scripts.

    body = multipart(image_parts([(png, "d.png")]))
    headers = {"Content-Type": multipart_type()}

Written by hand rather than by an HTTP client so that a body can be anything a client could send: odd
Content-Disposition parameters, many parts, a chosen boundary.
"""

from __future__ import annotations

BOUNDARY = "XbOuNdArY"


def image_parts(files: list[tuple[bytes, str]], field: str = "images") -> list[tuple[bytes, str]]:
    """(data, file name) pairs -> (data, Content-Disposition parameters) of file parts named `field`."""
    return [(data, f'name="{field}"; filename="{name}"') for data, name in files]


def multipart(parts: list[tuple[bytes, str]], boundary: str = BOUNDARY,
              content_type: str = "application/octet-stream") -> bytes:
    """A multipart/form-data body of (data, Content-Disposition parameters after `form-data; `) parts."""
    out = b""
    for data, disposition in parts:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; ".encode() + disposition.encode("latin-1")
                + f"\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    return out + f"--{boundary}--\r\n".encode()


def multipart_type(boundary: str = BOUNDARY) -> str:
    """The Content-Type header of a `multipart` body."""
    return f"multipart/form-data; boundary={boundary}"

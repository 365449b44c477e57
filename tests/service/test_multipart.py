"""service/multipart.py against two independent encoders/parsers: bodies built by httpx (what clients
send) must parse to the parts they were built from, and to what python-multipart (Starlette's form
parser) reads from them; malformed bodies raise MultipartError with a message."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from service.multipart import MultipartError, TooManyPartsError, boundary, params, parse


def encode(files=None, data=None) -> tuple[bytes, str]:
    """(body, Content-Type) as httpx sends them."""
    req = httpx.Request("POST", "http://x/encode", files=files, data=data)
    return req.read(), req.headers["content-type"]


def starlette_parts(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, data) of every part as python-multipart (through Starlette) reads them."""
    async def go():
        async def stream():
            yield body

        form = await MultiPartParser(Headers({"content-type": content_type}), stream(), max_files=10_000,
                                     max_fields=10_000).parse()
        out = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.append((name, value.filename, await value.read()))
            else:
                out.append((name, None, value.encode()))
        await form.close()
        return out

    return asyncio.run(go())


def ours(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    return [(p.name, p.filename, p.data) for p in parse(body, boundary(content_type), max_parts=10_000)]


# File contents that try to look like delimiters, line breaks and headers.
_tricky = st.lists(st.sampled_from([b"\r\n", b"--", b"\r\n--", b"-", b"\r", b"\n", b"Content-Disposition: x",
                                    b"\x00", b"\xff", b"abc", b"\r\n\r\n"]), max_size=12).map(b"".join)
_content = st.one_of(st.binary(max_size=300), _tricky)
_filename = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\%'), min_size=1,
                    max_size=20)


@settings(max_examples=150, deadline=None)
@given(files=st.lists(st.tuples(st.sampled_from(["images", "other", "x y"]), _filename, _content), max_size=6),
       fields=st.lists(st.tuples(st.sampled_from(["a", "images"]), st.text(max_size=20)), max_size=3))
def test_parses_what_httpx_sends_as_python_multipart_does(files, fields):
    files = files or [("images", "a.png", b"")]  # httpx sends fields alone url-encoded
    body, ctype = encode(files=[(n, (f, c, "image/png")) for n, f, c in files],
                         data={k: v for k, v in fields} or None)
    got = ours(body, ctype)
    assert got == starlette_parts(body, ctype)
    sent = [(k, None, v.encode()) for k, v in dict(fields).items()] + [(n, f, c) for n, f, c in files]
    assert sorted(got, key=repr) == sorted(sent, key=repr)


def test_headers_preamble_epilogue_and_parameters():
    body = (b"preamble, ignored\r\n--b0\r\ncontent-disposition: form-data; name=\"images\"; "
            b"filename=\"a \\\"q\\\".png\"\r\nContent-Type: image/png\r\n\r\nPNG\r\n"
            b"--b0\r\nContent-Disposition: form-data; name=images; "
            b"filename*=utf-8''%C3%A9t%C3%A9.png; filename=\"fallback.png\"\r\n\r\n\r\n--b0--\r\nepilogue")
    parts = parse(body, boundary('multipart/form-data; boundary="b0"'), max_parts=10)
    assert [(p.name, p.filename, p.content_type, p.data) for p in parts] == [
        ("images", 'a "q".png', "image/png", b"PNG"), ("images", "été.png", None, b"")]
    assert params('form-data; NAME="x;y"; filename=plain') == {"name": "x;y", "filename": "plain"}


@pytest.mark.parametrize("body, ctype, words", [
    (b"--b\r\n", "multipart/form-data", "no boundary parameter"),
    (b"--b\r\n", "multipart/form-data; boundary=" + "x" * 71, "invalid boundary"),
    (b"nothing here", "multipart/form-data; boundary=b", "does not contain the boundary"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nvalue", "multipart/form-data; boundary=b", "truncated"),
    (b"--b\r\nContent-Disposition: form-data; name=a", "multipart/form-data; boundary=b", "headers do not end"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n--b", "multipart/form-data; boundary=b",
     "closing boundary"),
    (b"--b\r\nContent-Type: text/plain\r\n\r\nv\r\n--b--", "multipart/form-data; boundary=b", "form-data"),
    (b"--b\r\nno colon\r\n\r\nv\r\n--b--", "multipart/form-data; boundary=b", "malformed header"),
    (b"--bX\r\n\r\nv\r\n--b--", "multipart/form-data; boundary=b", "line break after the boundary"),
])
def test_malformed_bodies_say_what_is_wrong(body, ctype, words):
    with pytest.raises(MultipartError, match=words):
        parse(body, boundary(ctype), max_parts=10)


def test_too_many_parts():
    body, ctype = encode(files=[("images", (f"{i}.png", b"x", "image/png")) for i in range(5)])
    assert len(parse(body, boundary(ctype), max_parts=5)) == 5
    with pytest.raises(TooManyPartsError, match="more than 4 parts"):
        parse(body, boundary(ctype), max_parts=4)


@settings(max_examples=200, deadline=None)
@given(charset=st.one_of(st.sampled_from(["utf-8", "UTF-8", "iso-8859-1", "us-ascii", "", "idna", "utf-7", "utf-16",
                                          "raw_unicode_escape", "unicode_escape", "rot13", "punycode", "undefined",
                                          "base64", "hex", "zlib"]),
                         st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", max_size=12)),
       encoded=st.one_of(st.text(st.characters(exclude_characters=';"\\\' \t\r\n', exclude_categories=["Cs"]),
                                 max_size=20), st.sampled_from(["%ED%A0%80", "%5Cud800", "+2AA-", "%FF%FE%00%D8",
                                                                 "%C3%A9", "%00"])),
       plain=st.sampled_from(["", '; filename="plain.png"']))
def test_extended_parameters_never_raise_and_give_valid_unicode(charset, encoded, plain):
    """RFC 8187 values (filename*=, boundary*=) in any charset: no exception, no lone surrogate; only UTF-8,
    ISO-8859-1 and US-ASCII are decoded, anything else leaves the plain value (or an empty one)."""
    for value in (f"form-data; name=images; filename*={charset}''{encoded}{plain}",
                  f"multipart/form-data; boundary*={charset}''{encoded}"):
        got = params(value)
        for text in got.values():
            text.encode("utf-8")  # raises on a lone surrogate
        key = "filename" if value.startswith("form-data") else "boundary"
        if charset.strip().lower() not in ("utf-8", "iso-8859-1", "us-ascii", ""):
            assert got[key] == ("plain.png" if plain and key == "filename" else "")
    with contextlib.suppress(MultipartError):  # no boundary, or an invalid one: fine; anything else is not
        boundary(f"multipart/form-data; boundary*={charset}''{encoded}")

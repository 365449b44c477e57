"""uvicorn, hardened: read deadlines and a connection cap per connection, and a shutdown that answers everyone.

`python -m service` runs the app with :func:`serve`. Three pieces extend uvicorn (0.54) where it has no setting:

- :class:`GuardedProtocol` (uvicorn's httptools protocol; uvicorn has no read timeouts for it): a request's head
  (request line and headers) must arrive within `header_timeout_s` of its first byte (of the connection, for the
  first request), and its body within `body_timeout_s` of its head; otherwise the client gets 408 and the
  connection is closed. A head larger than `max_header_bytes` gets 431. Beyond `max_connections` open connections
  a new one gets 503 and is closed at once. A slow client thus holds a few kilobytes for a bounded time: no task
  until its head is complete (the app sees a request only then), and a task waiting for its body at most
  `body_timeout_s`; never an inference worker.
- :class:`HeadWithBody` (the transport each request's response is written to): a response's head goes out together
  with its first body bytes, one write where uvicorn makes two.
- :class:`Server` (uvicorn's Server): on SIGTERM / SIGINT the app is told at once that it is draining (/ready
  answers 503), it goes on serving for `drain_s` (so that a load balancer can take it out of rotation), then
  uvicorn's graceful shutdown runs: no new connections, the requests in flight get `timeout_graceful_shutdown`
  seconds to finish. Every request still unanswered then (waiting for its body, queued in a batcher or running)
  is answered 503 before its task is cancelled, so no client accepted before the signal goes without an answer.

`uvicorn --factory service.app:create_app` serves the same app without either.

The stop deadlines of the deployment files must leave room for all this (tests/test_deploy.py checks them):
drain_s + timeout_graceful_shutdown + FINAL_ANSWER_S < the container engine's stop timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import problem_bytes
from service.settings import Settings

log = logging.getLogger("service.server")

# Seconds the cancelled requests get to unwind after the graceful timeout, before the app's own shutdown.
FINAL_ANSWER_S = 1.0


def _raw_problem(status: int, reason: str, title: str, detail: str, slug: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 problem+json response that closes the connection, written by the protocol itself."""
    body = problem_bytes(status, title, detail, slug)
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/problem+json",
            f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read deadline for every request head and body, a head size limit and
    a cap on open connections. The limits are class attributes, set by :func:`protocol_class`."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_header_bytes = 64 * 1024
    max_connections = 1024

    # One timer per connection at most, armed only while a read is incomplete at the end of a packet: a request
    # that arrives whole costs no timer.
    _timer: asyncio.TimerHandle | None = None
    _reading_head = True  # between a message's end (or the connection's start) and its headers' end
    _head_bytes = 0
    _head_started: float | None = None  # when the head being read began (None: no byte of it yet)
    _body_started = 0.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d open, the limit is %d", len(self.connections) - 1,
                        self.max_connections)
            self._abort(503, "Service Unavailable", "Too many connections", f"the server has its limit of "
                        f"{self.max_connections} open connections; retry later", "too-many-connections",
                        (("retry-after", "1"),))
            return
        self._head_started = self.loop.time()
        self._arm(self._head_started + self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            if self._head_started is None:  # the first bytes of a request after the previous one
                self._head_started = self.loop.time()
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._reading_head and self._head_bytes > self.max_header_bytes:
            self._abort(431, "Request Header Fields Too Large", "Request head too large", f"the request line and "
                        f"headers are larger than the limit of {self.max_header_bytes} bytes",
                        "request-header-fields-too-large")
        elif self._timer is None:
            if self._reading_head and self._head_started is not None:
                self._arm(self._head_started + self.header_timeout_s)
            elif self._in_body():
                self._arm(self._body_started + self.body_timeout_s)

    def on_headers_complete(self) -> None:
        self._reading_head, self._head_bytes = False, 0
        self._disarm()
        self._body_started = self.loop.time()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:  # a new request's cycle (not an upgrade)
            self.cycle.transport = HeadWithBody(self.transport, self.cycle)

    def on_message_complete(self) -> None:
        self._reading_head, self._head_bytes, self._head_started = True, 0, None
        self._disarm()
        super().on_message_complete()

    def _in_body(self) -> bool:
        c = self.cycle
        return c is not None and c.more_body and not c.response_complete and not c.disconnected

    def _arm(self, deadline: float) -> None:
        self._disarm()
        self._timer = self.loop.call_at(deadline, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._reading_head:
            what, limit = "the request line and headers", self.header_timeout_s
        elif self._in_body():
            what, limit = "the request body", self.body_timeout_s
        else:
            return
        log.info("closing a connection from %s: %s did not arrive within %g s (408)",
                 f"{self.client[0]}:{self.client[1]}" if self.client else "?", what, limit)
        self._abort(408, "Request Timeout", "Request timeout", f"{what} did not arrive within {limit:g} s",
                    "request-timeout")

    def _abort(self, status: int, reason: str, title: str, detail: str, slug: str,
               headers: tuple[tuple[str, str], ...] = ()) -> bool:
        """Answer `status` unless a response has begun, then close the connection. The request's app task, if
        any, then sees a disconnect and whatever it sends is dropped. True when the answer was written."""
        self._disarm()
        c = self.cycle
        # The current request has no response yet: none at all, or only the previous request's is complete.
        answered = c is None or c.response_complete or not c.response_started
        if answered:
            self.transport.write(_raw_problem(status, reason, title, detail, slug, headers))
        if c is not None and not c.response_complete:
            c.disconnected = True
            c.message_event.set()
        self.transport.close()
        return answered

    def answer_unfinished(self) -> bool:
        """Shutdown: answer 503 to the request in progress on this connection, if it has no response yet."""
        c = self.cycle
        if c is None or c.response_complete or c.disconnected:
            return False
        return self._abort(503, "Service Unavailable", "Shutting down", "the server is shutting down and could "
                           "not finish this request in time; retry it (on another instance)", "shutting-down",
                           (("retry-after", "1"),))


class HeadWithBody:
    """A response's transport that writes its head together with its first body bytes.

    uvicorn writes a response's status line and headers, then its body, in two writes: two send() system calls,
    and often two reads for the client, where one does. A head is held only when a body of known length
    (Content-Length, not HEAD) follows it; a large first body chunk is written after the head as before (joining
    them would copy it). Anything else (100 Continue, chunked bodies, close) passes through, the head first.
    """

    __slots__ = ("transport", "cycle", "head", "fresh")
    JOIN_LIMIT = 64 * 1024

    def __init__(self, transport, cycle):
        # The cycle by a weak reference: it holds this object, and a strong one back would make each request's
        # cycle (its scope, its body) garbage that only the collector frees.
        self.transport, self.cycle = transport, weakref.ref(cycle)
        self.head: bytes | None = None
        self.fresh = True  # no head written (or held) yet

    def write(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            self.head = None
            if len(data) <= self.JOIN_LIMIT:
                return self.transport.write(head + data)
            self.transport.write(head)
        elif self.fresh and (c := self.cycle()) is not None and c.response_started:  # the response's head
            self.fresh = False
            if c.chunked_encoding is False and c.expected_content_length > 0 and c.scope["method"] != "HEAD":
                self.head = data
                return None
        self.transport.write(data)

    def close(self) -> None:
        if self.head is not None:  # a response cut short: its head as it would have gone before
            self.transport.write(self.head)
            self.head = None
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


def protocol_class(settings: Settings) -> type[GuardedProtocol]:
    return type("GuardedProtocol", (GuardedProtocol,), {
        "header_timeout_s": settings.header_timeout_s, "body_timeout_s": settings.body_timeout_s,
        "max_header_bytes": settings.max_header_bytes, "max_connections": settings.max_connections})


class _DropCancelledRequests(logging.Filter):
    """uvicorn logs every cancelled request task as "Exception in ASGI application" with a traceback; after the
    graceful timeout those requests were answered 503 already, and their cancellation is the plan."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app_state: Any, drain_s: float):
        super().__init__(config)
        self.app_state, self.drain_s = app_state, drain_s
        self.draining_since: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler: set flags only (no logging: its locks are not reentrant).
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            self.app_state.draining = True
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if self.draining_since is None or self.force_exit:
            return should_exit
        if not self._drain_logged:
            self._drain_logged = True
            log.info("draining: /ready answers 503; serving %g s more, then a graceful shutdown of at most %g s",
                     self.drain_s, self.config.timeout_graceful_shutdown)
        return time.monotonic() - self.draining_since >= self.drain_s

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's shutdown, except that requests still unanswered at the graceful timeout get a 503."""
        self.app_state.draining = True
        logging.getLogger("uvicorn.error").info("Shutting down")
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        await asyncio.sleep(0.1)
        try:
            await asyncio.wait_for(self._wait_tasks_to_complete(), timeout=self.config.timeout_graceful_shutdown)
        except TimeoutError:
            answered = sum(c.answer_unfinished() for c in list(self.server_state.connections)
                           if isinstance(c, GuardedProtocol))
            tasks = list(self.server_state.tasks)
            log.warning("graceful shutdown timeout (%g s): answered 503 to %d unfinished request(s), cancelling "
                        "%d task(s)", self.config.timeout_graceful_shutdown, answered, len(tasks))
            quiet = _DropCancelledRequests()
            uvicorn_log = logging.getLogger("uvicorn.error")
            uvicorn_log.addFilter(quiet)
            try:
                for t in tasks:
                    t.cancel(msg="graceful shutdown timeout")
                if tasks:
                    await asyncio.wait(tasks, timeout=FINAL_ANSWER_S)
            finally:
                uvicorn_log.removeFilter(quiet)
            for c in list(self.server_state.connections):
                c.transport.close()
        if not self.force_exit:
            await self.lifespan.shutdown()


def serve(app, settings: Settings) -> None:
    """Run `app` (from create_app) until SIGTERM / SIGINT, with the protections above."""
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.access_log, proxy_headers=False, server_header=False,
                            timeout_graceful_shutdown=settings.timeout_graceful_shutdown,
                            http=protocol_class(settings))
    server = Server(config, app.state, settings.drain_s)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()

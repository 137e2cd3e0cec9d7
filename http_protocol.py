"""HTTP/1.1 connections with a deadline and a size budget for every request head.

uvicorn bounds a connection only while it is idle between two requests (`timeout_keep_alive`, armed when
a response ends). Nothing bounds the time before a head is complete: a socket that connects and sends
nothing, or one header byte now and then, is held for ever. And httptools keeps every header line it is
given until the blank line that ends the head, so the app's own size check comes after the memory is
spent. This protocol adds, per connection:

- a head deadline (HEADER_TIMEOUT) from accept, and on a kept-alive connection from the first byte of each
  later request, to the end of that request's head; past it the connection is closed, after a 408 when
  part of a head had arrived. Over TLS the protocol is made at accept but connected only after the
  handshake: the first head gets what the handshake left of the deadline (server.py bounds the handshake
  itself by HEADER_TIMEOUT);
- a head budget (MAX_HEADER_BYTES): bytes are counted as they arrive, before httptools sees them, and when
  more than the budget arrived without the end of the head the answer is 431 and nothing more is parsed
  (a pipelined head that starts in the read that ends the request before it is counted from the next
  read: at most one read more);
- a closing the client can read: after such an answer the service stops writing, drops whatever still
  arrives (never keeping it) and closes when the client does, or after LINGER seconds. An immediate close
  with unread bytes sends a TCP reset, which can destroy the answer before the client reads it.

It also tells a request that its client went away without a task listening for it: when the connection is
lost before the response is complete, `scope["state"]["client_gone"]` (false from the end of the head) becomes
true and the callable in
`scope["state"]["on_client_gone"]`, if one is there, is called (long polls and event streams end at once).

Between requests uvicorn's own keep-alive timer (KEEPALIVE_TIMEOUT) closes an idle connection, as before.
Reading path: connection_made → data_received (the budget) → httptools' on_message_begin …
on_headers_complete (the deadline ends) … on_message_complete (the next head's budget starts).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from errors import HeadersTooLarge, RequestError, RequestTimeout
from schemas import JSON_ENCODER
from validation import problem_for

LINGER = 2.0  # seconds a refused connection is drained, so that the client reads its answer


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a byte budget for each request head."""

    header_timeout = 10.0
    max_header_bytes = 16384
    # Ours in slots: five more keys in uvicorn's instance dict grew it from 296 to 1,584 bytes a connection.
    __slots__ = ("_accepted", "_deadline", "_head_room", "_in_head", "_refused")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the bytes that arrive belong to a request head that has not ended yet
        self._head_room = self.max_header_bytes  # bytes the current head may still take
        self._deadline: asyncio.TimerHandle | None = None  # the head's deadline, or the refused linger
        self._refused = False
        self._accepted = self.loop.time()  # the loop makes the protocol at accept, before any TLS handshake
        self.pipeline = _Pipeline()  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:
        """Start the first head's deadline, counted from accept: a socket that sends nothing is closed too."""
        super().connection_made(transport)
        self.flow = _FlowControl(transport)
        left = self.header_timeout - (self.loop.time() - self._accepted)
        self._deadline = self.loop.call_later(max(0.0, left), self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the pending deadline with the connection; tell an unfinished request its client is gone."""
        self._cancel_deadline()
        super().connection_lost(exc)
        cycle = self.cycle
        if cycle is not None and cycle.disconnected:
            client_gone(cycle.scope)

    def data_received(self, data: bytes) -> None:
        """Count a head's bytes before httptools keeps them; refuse the head once it is over the budget."""
        if self._refused:
            return  # draining after a refusal: read and dropped
        if not self._in_head:
            super().data_received(data)
            return
        if self._deadline is None:  # the first byte of a later request on a kept-alive connection
            self._deadline = self.loop.call_later(self.header_timeout, self._head_expired)
        room = self._head_room
        if len(data) <= room:
            self._head_room = room - len(data)
            super().data_received(data)
            return
        # Over the budget unless the head ends within it: parse only that much, then see.
        self._head_room = 0
        view = memoryview(data)
        super().data_received(view[:room])
        if self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(HeadersTooLarge(f"Request headers exceed MAX_HEADER_BYTES ({self.max_header_bytes} bytes)"))
        else:  # the head ended: the rest is its body, or the next request with a budget of its own
            self.data_received(view[room:])

    def on_headers_complete(self) -> None:
        """The head is complete: its deadline ends, the request goes to the app (told that this connection
        reports a client that goes away: `client_gone`)."""
        self._in_head = False
        self._cancel_deadline()
        self.scope["state"]["client_gone"] = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The request has been read: what follows is the next head, with a fresh budget."""
        super().on_message_complete()
        self._in_head = True
        self._head_room = self.max_header_bytes

    def _head_expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._head_room < self.max_header_bytes:  # part of a head arrived: say why it ends
            detail = f"The request head did not arrive within HEADER_TIMEOUT ({self.header_timeout:g} s)"
            self._refuse(RequestTimeout(detail))
        else:
            self.transport.close()

    def _refuse(self, error: RequestError) -> None:
        """Answer `error`, parse nothing more, and close once the client has had the chance to read it."""
        self._refused = True
        self._cancel_deadline()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a pipelined answer is being written: the connection ends with it
            return
        body = JSON_ENCODER.encode(problem_for(error))
        head = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(
            b"content-type: application/problem+json\r\nx-content-type-options: nosniff\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client sees the end of the answer; its own close ends the drain
        self._deadline = self.loop.call_later(LINGER, self.transport.close)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class _Pipeline(list):
    """The requests pipelined behind the one being answered, as uvicorn queues them: appendleft, pop. A list: an
    empty deque is 624 bytes on every connection, and pipelining is rare."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        """Queue `item` behind the others (`pop` takes the oldest)."""
        self.insert(0, item)


class _FlowControl(FlowControl):
    """uvicorn's flow control, with the Event only a paused writer waits on made when writing first pauses (an
    Event is ~760 bytes, on every connection, and most never pause)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._is_writable_event: asyncio.Event | None = None  # type: ignore[assignment]

    async def drain(self) -> None:
        """Wait until the transport takes writes again."""
        if self._is_writable_event is not None:
            await self._is_writable_event.wait()

    def pause_writing(self) -> None:
        """The transport's buffer is full: writers wait."""
        if not self.write_paused:
            self.write_paused = True
            if self._is_writable_event is None:
                self._is_writable_event = asyncio.Event()
            self._is_writable_event.clear()

    def resume_writing(self) -> None:
        """The transport's buffer drained: writers go on."""
        if self.write_paused:
            self.write_paused = False
            if self._is_writable_event is not None:
                self._is_writable_event.set()


def client_gone(scope: Any) -> None:
    """Mark the request of `scope` as left by its client, and call the callable it registered for that."""
    state = scope.get("state")
    if state is not None:
        state["client_gone"] = True
        callback = state.pop("on_client_gone", None)
        if callback is not None:
            callback()


def http_protocol(header_timeout: float, max_header_bytes: int) -> type[HttpProtocol]:
    """The protocol class to hand uvicorn as `http=`, with these limits."""
    limits = {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes}
    return type("HttpProtocol", (HttpProtocol,), limits)

"""Connections: uvicorn's settings for them, and the one deadline uvicorn lacks.

uvicorn closes a keep-alive connection that stays idle (``timeout_keep_alive``),
answers 503 beyond ``limit_concurrency`` connections or requests, and h11 refuses a
request head over 16 KB. It has no deadline for the head itself: a connection that
sends nothing, or half a request line, is held until the client goes away, and a
few hundred of them use up the process's file descriptors. :func:`protocol` adds
that deadline to uvicorn's h11 protocol: a request's head must be complete within
``header_timeout_s`` of the connection opening (or of the previous answer on a
keep-alive connection), else the connection is closed. The body's deadline is the
ASGI side's (``guards.Guard``), as it needs no access to the transport.
"""

from __future__ import annotations

import asyncio


def protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline on each request's head (the class uvicorn's ``http=`` takes)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._start_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next request's head gets the same time
                self._start_head_timer()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _start_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_overdue)

        def _head_overdue(self) -> None:
            self._head_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is in progress: its head came in time (its body has its own deadline)
            if not self.transport.is_closing():
                self.transport.close()

    return DeadlineH11Protocol

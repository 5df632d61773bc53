"""uvicorn's h11 protocol with a deadline for request headers and a connection cap.

uvicorn 0.54 has a keep-alive timeout and `limit_concurrency` (which answers 503 to new
requests once that many connections are open, half-open ones included) but no header
timeout: a client sending one header byte at a time (slowloris) holds its socket forever.
Here every connection must deliver a complete request head within `header_timeout` of
opening (or of its last response); and past `max_connections` the oldest connection that
is not inside a request is closed to make room, so idle sockets cannot starve real ones.
"""

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._born = self.loop.time()
            self._head_timer = None
            self._arm()
            if len(self.connections) > max_connections:
                self._evict()

        def _arm(self):
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _disarm(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _head_timeout(self):
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request in %g s", header_timeout)
                self._close()

        def _close(self):
            self._disarm()
            if self.conn.our_state not in (h11.ERROR, h11.CLOSED, h11.MUST_CLOSE):
                try:
                    self.conn.send(h11.ConnectionClosed())
                except h11.LocalProtocolError:
                    pass
            self.transport.close()

        def _evict(self):
            idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol)
                    and c._waiting_for_head() and not c.transport.is_closing()]
            victim = min(idle, key=lambda c: c._born) if idle else self
            self.logger.warning("over %d connections: closing the oldest idle one", max_connections)
            victim._close()

        def handle_events(self):
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle and not self._waiting_for_head():
                self._disarm()  # a complete request head arrived

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection gets the same deadline

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol

"""The forwarding stage: one decided request sent upstream, with the backend-error boundary.

``exchange.Outgoing`` is what the earlier stages decided about a request (where it goes and what
is sent), built once. ``Forwarder.run`` sends it through the relay while watching for the client leaving
and for the total timeout; it is the one place where httpcore's and the OS's exceptions become
the gateway's backend errors. Any other exception is a bug in the gateway: it propagates to the
application's boundary (``app.py``), which logs it with its traceback and answers 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpcore

from gateway import errors
from gateway.errors import GatewayError, error_class, map_error
from gateway.exchange import Exchange, Outgoing
from gateway.pool import PoolClosed, PoolTimeout
from gateway.relay import OnReplica, Timeouts, attempt, fail, forward
from gateway.types import Receive, Send
from gateway.watch import DisconnectWatch

log = logging.getLogger("gateway")

#: What a backend (or the network to it) can throw: mapped to 502/503/504, counted as upstream errors.
BACKEND_ERRORS: tuple[type[Exception], ...] = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ConnectionNotAvailable,
    httpcore.UnsupportedProtocol,
    OSError,
)


class Forwarder:
    """Runs ``Outgoing`` requests for one worker: its timeouts, retries and disconnect watcher."""

    __slots__ = ("timeouts", "retries", "total_timeout", "watch", "_loop", "on_replica")

    def __init__(
        self,
        timeouts: Timeouts,
        retries: int,
        total_timeout: float | None,
        loop: Callable[[], asyncio.AbstractEventLoop],
    ) -> None:
        self.timeouts = timeouts
        self.retries = retries
        self.total_timeout = total_timeout
        self.watch = DisconnectWatch()
        self._loop = loop
        #: Runs each attempt on a replica: ``relay.attempt``, or with tracing on, the same inside a
        #: span (``tracing.Tracing.wrap``), chosen once at startup rather than checked per request.
        self.on_replica: OnReplica = attempt

    async def run(self, out: Outgoing, receive: Receive, send: Send, ex: Exchange) -> None:
        """Forward with cancellation on client disconnect (and on the total timeout, if set)."""
        loop = self._loop()
        task = asyncio.current_task(loop)
        assert task is not None
        watch = self.watch
        watch.add(ex, receive, task, loop)
        total = self.total_timeout
        timer = loop.call_later(total, _expire, ex, task) if total else None
        try:
            await forward(out, self.timeouts, self.retries, send, ex, self.on_replica)
        except asyncio.CancelledError:
            if ex.cancelled_by is None:
                raise
            task.uncancel()
            if ex.cancelled_by == "timeout":
                ex.end, ex.error_class = "timeout", "timeout"
                await fail(send, ex, errors.backend_timeout(f"GATEWAY_TOTAL_TIMEOUT ({total:g} s) passed"))
            else:
                ex.end = "client_gone"
        except GatewayError as err:
            await fail(send, ex, err)
        except (PoolTimeout, PoolClosed) as exc:  # the gateway's own pool: full, or shut down
            await fail(send, ex, map_error(exc, ex.phase))
        except BACKEND_ERRORS as exc:  # the one place backend failures become gateway errors
            ex.error_class = error_class(exc)
            ex.end = "timeout" if ex.error_class == "timeout" else "upstream_error"
            log.warning("upstream %s failed waiting for %s: %r", out.backend.name, ex.phase, exc)
            await fail(send, ex, map_error(exc, ex.phase))
        finally:
            ex.active = False
            watch.discard(ex)
            if timer is not None:
                timer.cancel()


def _expire(ex: Exchange, task: asyncio.Task[object]) -> None:
    if ex.active and ex.cancelled_by is None:
        ex.cancelled_by = "timeout"
        task.cancel()

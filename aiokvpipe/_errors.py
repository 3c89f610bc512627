"""The exceptions aiokvpipe raises.

Three ways a pipe ends, kept apart so callers can react to each:

* :class:`PipeClosed` -- the pipe was closed on purpose, by this side (``aclose()``) or by the
  peer's graceful ``aclose()`` once everything it sent has been received.
* :class:`BrokenPipe` -- the other side broke: it died, the connection dropped, a heartbeat was
  missed or the peer violated the protocol. The original cause is chained (``__cause__``).
* :class:`ProtocolError` / :class:`AuthenticationError` -- what the peer sent is not aiokvpipe,
  or it could not prove it knows the shared token.
* :class:`PeerFailure` -- the peer told us that it failed on its side (out of memory, a CUDA
  error): chained to the :class:`BrokenPipe` it causes here. Our own failures are never
  reported as the peer's: a local error is chained as it is.

Argument errors (``TypeError``/``ValueError``) are raised for bad input to *our* API and never
tear down a healthy pipe.
"""

from __future__ import annotations

import copy
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def fresh(exc: E) -> E:
    """A new exception like ``exc``: same type, message and cause, no traceback.

    A pipe's terminal error reaches many callers. Raising one instance everywhere would chain
    every caller's frame into its traceback, and with the frames everything they hold (the
    tensors being sent, say) for as long as the pipe keeps the error. Each caller gets a copy.
    """
    try:
        new = copy.copy(exc)
    except Exception:  # noqa: BLE001  -- a type whose __init__ takes other arguments than
        # its args (NcclError, DriverError: message and code): made without calling it
        new = type(exc).__new__(type(exc), *exc.args)
        new.__dict__.update(getattr(exc, "__dict__", {}))
    new.__cause__ = exc.__cause__
    new.__suppress_context__ = True
    return new


__all__ = [
    "PipeError",
    "BrokenPipe",
    "PipeClosed",
    "ProtocolError",
    "AuthenticationError",
    "PeerFailure",
]


class PipeError(Exception):
    """Base class of every error aiokvpipe raises about a pipe."""


class BrokenPipe(PipeError, BrokenPipeError):
    """The peer died, the connection broke, a heartbeat was missed, or the wire was violated.

    Terminal: every pending and later ``send``/``recv`` on the pipe raises it. ``__cause__``
    holds what broke the pipe.
    """


class PipeClosed(PipeError):
    """The pipe was closed gracefully: by ``aclose()`` here, or by the peer after delivering
    everything it had sent."""


class ProtocolError(PipeError):
    """Bytes from the peer do not follow the aiokvpipe wire format (or its limits)."""


class PeerSaysProtocolError(ProtocolError):
    """The peer reports that *our* bytes broke the wire format, and dropped the pipe: the
    blame goes the other way from a :class:`ProtocolError` raised here about the peer's
    bytes (which is told to the peer; this one is not told back). Found as the
    ``__cause__`` of a :class:`BrokenPipe`."""


class AuthenticationError(PipeError):
    """The handshake failed because one side could not prove it holds the shared token."""


class PeerFailure(PipeError):
    """The peer reported a failure of its own (it could not allocate a receive buffer, say)
    and dropped the pipe. Found as the ``__cause__`` of a :class:`BrokenPipe`."""

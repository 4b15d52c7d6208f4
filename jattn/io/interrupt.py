"""Stopping compiled work on Ctrl-C within about one UNet call.

A jitted sampler loop (``lax.scan`` over hundreds of steps) runs in XLA with the GIL
released: Python's SIGINT handler only runs when the whole program returns, which for 16
prompts × 1000 steps took 70-100 s. With :func:`enable`, every UNet call of a pipeline
traced afterwards carries a host check (``jax.debug.callback``) that reads a flag set from
the signal: the check raises, XLA aborts the program at that call, and the caller sees
:class:`Interrupted`.

The flag is set by a SIGINT handler that works while the main thread waits in XLA: the C
signal handler writes to a wakeup socket (``signal.set_wakeup_fd``), which the check reads
from XLA's thread. The check costs one host callback per UNet call (microseconds on CPU;
a device→host round trip on GPU/TPU), so it is off unless enabled: the CLI enables it for
its own commands; API users call :func:`enable` before their first ``generate``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import jax

__all__ = ["Interrupted", "enable", "enabled", "check_in_graph", "request", "reset",
           "requested", "is_interrupt"]

_STATE = {"enabled": False, "sock": None}
_EVENT = threading.Event()
_MARK = "jattn: interrupted by the user"


class Interrupted(KeyboardInterrupt):
    """Raised by the in-graph check after SIGINT (a KeyboardInterrupt subclass)."""


def _drain() -> bool:
    """True when a SIGINT byte arrived on the wakeup socket (or :func:`request` was called)."""
    sock = _STATE["sock"]
    if sock is not None:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            data = b""
        except OSError:
            data = b""
        if signal.SIGINT in data:
            _EVENT.set()
    return _EVENT.is_set()


def _check() -> None:
    if _drain():
        _STATE["fired"] = True
        raise Interrupted(_MARK)


def _on_sigint(signum, frame) -> None:
    """Python-level SIGINT handler: raise KeyboardInterrupt as Python does, except right
    after the in-graph check already stopped XLA (then the caller is handling that error,
    and a second exception inside its handler would escape as a traceback)."""
    if _STATE.get("fired"):
        return
    raise Interrupted(_MARK)


def _quiet(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, Interrupted)


def enable(install_handler: bool = True) -> None:
    """Turn the per-UNet-call check on for programs traced from now on.

    ``install_handler``: route SIGINT to the flag (main thread only; otherwise only
    :func:`request` sets it). The Python-level handler still raises KeyboardInterrupt
    (:class:`Interrupted`) when the main thread runs Python code, except just after the
    in-graph check has fired (see :func:`_on_sigint`).
    """
    _STATE["enabled"] = True
    if install_handler and _STATE["sock"] is None and \
            threading.current_thread() is threading.main_thread():
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        try:
            signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            r.close()
            w.close()
            return
        _STATE["sock"], _STATE["wsock"] = r, w
        signal.signal(signal.SIGINT, _on_sigint)
    # a failing debug callback is logged with its traceback before XLA aborts: the caller
    # reports the interrupt in one line instead
    log = logging.getLogger("jax._src.debugging")
    if _quiet not in log.filters:
        log.addFilter(_quiet)


def enabled() -> bool:
    """Whether programs traced now carry the check."""
    return _STATE["enabled"]


def check_in_graph() -> None:
    """Emit the host check into the program being traced (no-op when not enabled)."""
    if _STATE["enabled"]:
        jax.debug.callback(_check)


def request() -> None:
    """Set the flag by hand (tests; another thread's stop button)."""
    _EVENT.set()


def requested() -> bool:
    """Whether an interrupt was requested (SIGINT received since the last :func:`reset`)."""
    return _drain()


def reset() -> None:
    """Clear the flag."""
    _drain()
    _EVENT.clear()
    _STATE["fired"] = False


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is the interrupt: a KeyboardInterrupt, or XLA's runtime error that
    wraps the check's exception."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    return _MARK in str(exc) or (requested() and "CpuCallback error" in str(exc))


if os.environ.get("JATTN_INTERRUPTIBLE") == "1":  # opt in for API users without code
    enable(install_handler=False)

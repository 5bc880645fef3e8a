"""py-libp2p's log records, kept at DEBUG under our own logger name.

``import libp2p`` (0.8.1: ``libp2p.utils.logging.setup_logging``) leaves the ``libp2p`` logger with no handler,
level WARNING and ``propagate = False`` unless ``LIBP2P_DEBUG`` is set. Its warnings and errors then reach
Python's last-resort handler, which prints them bare on stderr ("Failed to open TCP stream: ...", "Rate limit
exceeded for peer ...") whatever the application configured, and the application cannot route them anywhere.

:func:`libp2p_logs_at_debug` gives that logger one handler, which re-emits each record at DEBUG through
``p2pcompute.libp2p.<module>`` (the record's text keeps its original level): silent unless the application
enables DEBUG for p2pcompute, and then formatted and routed like the rest of its logs. The root logger is never
touched. With ``LIBP2P_DEBUG`` set, the user asked for py-libp2p's own logging, and it is left alone.
"""

from __future__ import annotations

import logging
import os
from typing import Final

__all__ = ["RELAY_LOGGER", "libp2p_logs_at_debug"]

#: py-libp2p's records appear under this logger (and its children, one per py-libp2p module).
RELAY_LOGGER: Final = "p2pcompute.libp2p"
_LIBP2P_LOGGER: Final = "libp2p"


class _DebugRelay(logging.Handler):
    """Re-emit a py-libp2p record at DEBUG under ``p2pcompute.libp2p.<module>``."""

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name.removeprefix(_LIBP2P_LOGGER).lstrip(".")
        target = logging.getLogger(f"{RELAY_LOGGER}.{name}" if name else RELAY_LOGGER)
        if not target.isEnabledFor(logging.DEBUG):
            return
        try:
            text = record.getMessage()
        except Exception:  # a malformed format string in the library: keep the raw message
            text = str(record.msg)
        relayed = logging.makeLogRecord(
            {**record.__dict__, "name": target.name, "levelno": logging.DEBUG, "levelname": "DEBUG"}
        )
        relayed.msg, relayed.args = f"{record.levelname.lower()}: {text}", None
        target.handle(relayed)


def libp2p_logs_at_debug() -> None:
    """Route py-libp2p's log records to DEBUG under :data:`RELAY_LOGGER` (idempotent, process-wide).

    Imports libp2p first: its import resets the ``libp2p`` logger's handlers. Also gives the ``p2pcompute``
    logger a ``NullHandler`` (the library convention), so an application that configured no logging does not
    get our warnings on stderr through the last-resort handler either.
    """
    import libp2p  # noqa: F401  (its import configures the logger we adjust)

    own = logging.getLogger("p2pcompute")
    if not any(isinstance(h, logging.NullHandler) for h in own.handlers):
        own.addHandler(logging.NullHandler())
    if os.environ.get("LIBP2P_DEBUG"):
        return
    library = logging.getLogger(_LIBP2P_LOGGER)
    if not any(isinstance(h, _DebugRelay) for h in library.handlers):
        library.addHandler(_DebugRelay())

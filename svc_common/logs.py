"""structlog set-up, done once per process entry point.

JSON lines when stderr is not a terminal (services under `fastswitch up`, docker), console otherwise.
Request ids and other context are bound through contextvars (`bind_contextvars`).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure_logging(service: str, level: str | None = None) -> None:
    """Configure structlog for this process; every line carries `service`."""
    global _configured
    level_name = (level or os.environ.get("FASTSWITCH_LOG_LEVEL", "info")).upper()
    renderer: structlog.types.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)

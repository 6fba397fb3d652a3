"""Logging to stderr in a form go-plugin understands: a [LEVEL] prefix sets the level of the
line in AOG's log. stdout is never used (in plugin mode it carries only the handshake)."""

from __future__ import annotations

import logging
import os
import sys

_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR",
           "CRITICAL": "ERROR"}


class _GoPluginFormatter(logging.Formatter):

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        level = _LEVELS.get(record.levelname, "INFO")
        # One line per record, so go-plugin keeps the level for all of it.
        return f"[{level}] {self.prefix}{record.name}: " + text.replace("\n", "\n    ")


def setup_logging(prefix: str = "", level: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_GoPluginFormatter(prefix))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("OVMS_PLUGIN_LOG_LEVEL", "INFO").upper())

"""Logging to stderr in a form go-plugin understands: a [LEVEL] prefix sets the level of the
line in AOG's log. stdout is never used (in plugin mode it carries only the handshake)."""

from __future__ import annotations

import logging
import os
import re
import sys

_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR",
           "CRITICAL": "ERROR"}


# Line breaks and other control characters (C0, DEL, C1, Unicode line separators).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """Control characters shown as escapes, so text from outside (model names, paths,
    request fields) cannot forge log lines or hide in them."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def _message(record: logging.LogRecord) -> str:
    """The record's message with its arguments escaped: the format string is ours, the
    arguments may come from outside. Numbers keep their type for %d and %f."""
    args = record.args
    if isinstance(args, tuple) and args:
        safe = tuple(a if isinstance(a, int | float) else escape(str(a)) for a in args)
        try:
            return str(record.msg) % safe
        except (TypeError, ValueError):
            pass  # a %r or a mapping: escape the whole message instead
    return escape(record.getMessage())


class _GoPluginFormatter(logging.Formatter):

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = _message(record)
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

"""The daemon's log line formats: `text` for people and journald, `json` for log pipelines.

Why JSON as an option: operators who ship logs to Loki, Elasticsearch or a SIEM want fields
(level, logger, message, time) they do not have to cut out of text with a regex that breaks when
a message changes. One record is one line either way: a message or traceback that spans lines
is escaped inside the JSON string, so no line is ever a fragment.
"""

from __future__ import annotations

import json
import logging
import time

#: The values of the `log_format` key.
LOG_FORMATS = ("text", "json")

#: syslog priorities for the "<N>" prefix journald understands on stdout/stderr (sd-daemon(3)).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def priority(record: logging.LogRecord) -> int:
    return _PRIORITY.get(record.levelno, 6)


class JournalFormatter(logging.Formatter):
    """`<N>level: message`: journald takes the priority from <N> and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        prio = priority(record)
        text = super().format(record)
        # journald splits on newlines: give every line (e.g. of a traceback) the priority.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC, ms), level, logger, message, pid, and the
    exception text when there is one. With `journal`, the line is prefixed with `<N>` so
    journald still files it under the right priority."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        line = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        return f"<{priority(record)}>{line}" if self.journal else line


def formatter(log_format: str, journal: bool) -> logging.Formatter:
    """The formatter for `log_format` ("text" or "json"), on journald or a plain stream."""
    if log_format == "json":
        return JsonFormatter(journal)
    if journal:
        return JournalFormatter("%(levelname)s: %(name)s: %(message)s")
    return logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                             "%Y-%m-%d %H:%M:%S")

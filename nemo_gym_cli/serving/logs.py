"""Logging setup shared by every process: plain lines on stderr, secrets scrubbed."""

from __future__ import annotations

import logging
import sys


class ScrubSecrets(logging.Filter):
    """Replace every known secret value in a log record's text with ****."""

    def __init__(self, secrets: set[str]):
        super().__init__()
        self.secrets = sorted(secrets, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            for s in self.secrets:
                text = text.replace(s, "****")
            record.msg, record.args = text, None
        return True


def scrub(text: str, secrets: set[str]) -> str:
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "****")
    return text


class ScrubbingStream:
    """A text stream that masks secrets in whatever is written to it (print() included)."""

    def __init__(self, stream, secrets: set[str]):
        self._stream, self._secrets = stream, secrets

    def write(self, text: str) -> int:
        return self._stream.write(scrub(text, self._secrets))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def setup_logging(level: int = logging.INFO, secrets: set[str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(ScrubSecrets(secrets or set()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def make_console(stderr: bool = False):
    """A rich console that does not squeeze tables to 80 columns when output is piped."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=None if stream.isatty() else 160)

"""Cookies a server sets for a session, kept per (server, session) and sent back on that
session's later calls: NeMo Gym's stateful servers keep an episode's state under their own
(Starlette) session cookie, not under X-Session-ID.

Cookies come from a remote server, so only RFC 6265 names and values are kept (nothing else can
reach a header), at most MAX_PER_SESSION per session and MAX_SESSIONS sessions (least recently
used dropped); a session's cookies go when it is released. Our own session cookie is not kept:
our servers read X-Session-ID, which every call carries.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Iterable

from nemo_gym_cli.serving.protocol import SESSION_COOKIE

MAX_SESSIONS = 100_000
MAX_PER_SESSION = 16
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}")
_VALUE = re.compile(r'"?[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]{0,4096}"?')


def parse_set_cookie(header: str) -> tuple[str, str] | None:
    """(name, value) of a Set-Cookie header value, or None when it is not a valid cookie."""
    pair = header.split(";", 1)[0]
    name, sep, value = pair.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
        return None
    return name, value


class SessionCookies:
    def __init__(self, max_sessions: int = MAX_SESSIONS):
        self.max_sessions = max_sessions
        self.jars: OrderedDict[tuple[str, str], dict[str, str]] = OrderedDict()

    def header(self, server: str, session_id: str) -> str | None:
        """The Cookie header for a call of this session to this server, if it has cookies."""
        jar = self.jars.get((server, session_id))
        if not jar:
            return None
        self.jars.move_to_end((server, session_id))
        return "; ".join(f"{k}={v}" for k, v in jar.items())

    def store(self, server: str, session_id: str, set_cookies: Iterable[str]) -> None:
        for header in set_cookies:
            if header.startswith(SESSION_COOKIE + "="):
                continue
            parsed = parse_set_cookie(header)
            if parsed is None:
                continue
            key = (server, session_id)
            jar = self.jars.get(key)
            if jar is None:
                jar = self.jars[key] = {}
                if len(self.jars) > self.max_sessions:
                    self.jars.popitem(last=False)
            if parsed[0] in jar or len(jar) < MAX_PER_SESSION:
                jar[parsed[0]] = parsed[1]

    def forget(self, session_ids: Iterable[str]) -> None:
        gone = set(session_ids)
        if gone and self.jars:
            for key in [k for k in self.jars if k[1] in gone]:
                del self.jars[key]

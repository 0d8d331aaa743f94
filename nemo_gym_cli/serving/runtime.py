"""Event loop choice: uvloop where installed (measured faster in bench/), asyncio otherwise."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    if os.environ.get("NG_NO_UVLOOP") != "1":
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            pass
    return asyncio.run(coro)

"""Which config keys are secrets, and how they are masked in dumps and scrubbed from logs."""

from __future__ import annotations

from typing import Any

NO_API_KEY = "EMPTY"  # the api_key of a server that needs none (vLLM's convention): never sent, never masked
_SECRET_WORDS = ("api_key", "apikey", "secret", "password", "passwd")


def is_secret_key(key: Any) -> bool:
    """`api_key`, `hf_token`, `client_secret`... but not `max_tokens` or `prompt_token_ids`."""
    k = str(key).lower().replace("-", "_")
    return any(w in k for w in _SECRET_WORDS) or k == "token" or k.endswith("_token")


def mask_secrets(obj: Any) -> Any:
    """A copy of obj with every secret value replaced by '****'."""
    if isinstance(obj, dict):
        return {k: ("****" if is_secret_key(k) and v not in (None, "") else mask_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mask_secrets(v) for v in obj]
    return obj


def secret_values(obj: Any) -> set[str]:
    """Every secret string in a config, so log lines can be scrubbed of them."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret_key(k) and isinstance(v, str) and len(v) >= 4 and v != NO_API_KEY:
                found.add(v)
            else:
                found |= secret_values(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= secret_values(v)
    return found

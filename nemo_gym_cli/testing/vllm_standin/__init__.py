"""A deterministic stand-in for a vLLM OpenAI-compatible server (vLLM 0.32 response shapes).

Why it exists: tests, benchmarks and the README demo need "a vLLM" on machines without a
GPU. It answers with the same JSON shapes as vLLM, simulates the parts of vLLM that the
rollout stack reacts to (scheduler queueing, prefix cache hits, context-length 400s,
/tokenize, /metrics) and is fast enough that benchmarks measure our stack, not this fake.

Run it with `ng_vllm_standin --port 0 --port-file /tmp/port` or
`python -m nemo_gym_cli.testing.vllm_standin`. See `cli.build_parser()` for the flags.

Behaviour in one paragraph: with tools and tool_choice "required" (or a named function)
it always calls a tool; with tool_choice "auto" it calls the first tool while fewer than
--tool-call-turns tool results follow the last user message; otherwise it answers
"The answer is: <last user message>" (or "Based on the tool result: ..." right after a
tool result). A --script file of rules overrides that: {"match": <substring of the prompt, or a list
of substrings all in it>, and
"content": <text> | "status": <HTTP error> | "tool_call": {"name", "arguments": <raw string>},
optionally "reasoning": <text>}; the first matching rule wins.

One module per concern: tokenizer (ids and the chat template), model (what it answers),
prefix_cache, engine (scheduler, counters, one completion), metrics (Prometheus text),
responses (vLLM's JSON shapes), app (HTTP routes), cli (flags, serving).
"""

from nemo_gym_cli.testing.vllm_standin.app import build_app
from nemo_gym_cli.testing.vllm_standin.engine import StandinConfig

__all__ = ["StandinConfig", "build_app"]

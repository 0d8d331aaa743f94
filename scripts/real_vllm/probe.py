#!/usr/bin/env python3
"""Smoke probe of the real vLLM setup: starts two servers with the harness
(nemo_gym_cli.testing.harness.real_vllm), checks
the response shapes the project relies on, prints them, and stops both servers.

Usage: .venv/bin/python scripts/real_vllm/probe.py [OUT_JSON]     (the project's venv)
Needs scripts/real_vllm/install.sh to have run. Exit status 0 = every check passed.
"""
from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from nemo_gym_cli.testing.harness import ensure_installed, free_port, start_real_vllm

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
USER = [{"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "What is the weather in Paris today?"}]

report: dict = {}
failures: list[str] = []


def check(cond: bool, what: str) -> None:
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def http(base: str, path: str, body: dict | None = None, headers: dict | None = None):
    req = urllib.request.Request(base + path, method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw, status, hdrs = r.read().decode(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read().decode(), e.code, dict(e.headers)
    try:
        return status, json.loads(raw), hdrs
    except json.JSONDecodeError:
        return status, raw, hdrs


def counters(srv) -> dict:
    names = ["vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
             "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"]
    return {n: srv.metric(n) for n in names}


def main() -> int:
    ok, why = ensure_installed()
    if not ok:
        print("cannot probe:", why)
        return 2
    logdir = Path(tempfile.mkdtemp(prefix="real_vllm_probe_"))
    servers: dict = {}

    def start(name: str) -> None:
        port = free_port()
        servers[name] = start_real_vllm(port, logdir / f"{name}.log")

    t0 = time.monotonic()
    threads = [threading.Thread(target=start, args=(n,)) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if set(servers) != {"A", "B"}:
            print("a server did not start; logs in", logdir)
            return 1
        a, b = servers["A"], servers["B"]
        report["startup_s"] = {"A": round(a.startup_s, 1), "B": round(b.startup_s, 1),
                               "both_wall": round(time.monotonic() - t0, 1)}
        print("startup", report["startup_s"], "logs in", logdir)
        base = a.base_url

        _, models, _ = http(base, "/v1/models")
        report["v1_models"] = models
        check(models["data"][0]["id"] == a.model, f"/v1/models lists {a.model!r}")
        _, wrong, _ = http(base, "/v1/chat/completions", {"model": "nope", "messages": USER, "max_tokens": 2})
        report["wrong_model_error"] = wrong

        before_a, before_b = counters(a), counters(b)

        # --- turn 1: forced tool call ---------------------------------------------------------
        body1 = {"model": a.model, "messages": USER, "tools": [WEATHER_TOOL], "tool_choice": "required",
                 "temperature": 0, "max_tokens": 64}
        st, r1, h1 = http(base, "/v1/chat/completions", body1, {"X-Session-ID": "probe-session-1"})
        report["turn1"] = r1
        report["turn1_headers"] = h1
        check(st == 200, "X-Session-ID header accepted (200)")
        msg1 = r1["choices"][0]["message"]
        calls = msg1.get("tool_calls") or []
        check(len(calls) >= 1 and calls[0]["function"]["name"] == "get_weather", "turn 1 returns tool_calls")
        if calls:
            check(isinstance(json.loads(calls[0]["function"]["arguments"]), dict), "arguments is a JSON object string")

        # --- turn 2: tool result -> text ------------------------------------------------------
        assistant = {"role": "assistant", "content": msg1.get("content"), "tool_calls": calls}
        tool_msg = {"role": "tool", "tool_call_id": calls[0]["id"] if calls else "x", "content": "Sunny, 21 C"}
        msgs2 = USER + [assistant, tool_msg]
        report["turn2"] = {}
        for choice in ("auto", "none", None):
            body2 = {"model": a.model, "messages": msgs2, "tools": [WEATHER_TOOL], "temperature": 0, "max_tokens": 16}
            if choice is not None:
                body2["tool_choice"] = choice
            st, r2, _ = http(base, "/v1/chat/completions", body2, {"X-Session-ID": "probe-session-1"})
            report["turn2"][str(choice)] = r2
            m2 = r2["choices"][0]["message"] if st == 200 else {}
            check(st == 200 and bool(m2.get("content")) and not m2.get("tool_calls"),
                  f"turn 2 tool_choice={choice}: text answer")
        cached = report["turn2"]["auto"]["usage"].get("prompt_tokens_details")
        report["turn2_cached"] = cached
        check(bool(cached) and cached.get("cached_tokens", 0) > 0, "turn 2 usage.prompt_tokens_details.cached_tokens > 0")

        # --- logprobs as token ids ------------------------------------------------------------
        st, r3, _ = http(base, "/v1/chat/completions", {
            "model": a.model, "messages": USER, "temperature": 0, "max_tokens": 4,
            "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True})
        report["logprobs"] = r3
        content_lp = r3["choices"][0]["logprobs"]["content"]
        check(all(e["token"].startswith("token_id:") for e in content_lp), "logprobs tokens look like token_id:N")

        # --- return_token_ids (prompt + completion ids in the response) ------------------------
        st, r4, _ = http(base, "/v1/chat/completions", {
            "model": a.model, "messages": USER, "temperature": 0, "max_tokens": 4, "return_token_ids": True})
        report["return_token_ids"] = {"status": st, "top_keys": sorted(r4) if isinstance(r4, dict) else r4,
                                      "choice_keys": sorted(r4["choices"][0]) if st == 200 else None,
                                      "prompt_token_ids": r4.get("prompt_token_ids") if st == 200 else None,
                                      "token_ids": r4["choices"][0].get("token_ids") if st == 200 else None}

        # --- /tokenize -----------------------------------------------------------------------
        st, tk, _ = http(base, "/tokenize", {"model": a.model, "messages": USER})
        report["tokenize"] = tk
        check(st == 200 and isinstance(tk.get("tokens"), list) and all(isinstance(t, int) for t in tk["tokens"]),
              "/tokenize returns token ids")
        st, tk_tools, _ = http(base, "/tokenize", {"model": a.model, "messages": USER, "tools": [WEATHER_TOOL]})
        report["tokenize_with_tools"] = {"status": st, "count": tk_tools.get("count") if st == 200 else tk_tools,
                                         "turn1_prompt_tokens": r1["usage"]["prompt_tokens"]}
        if report["return_token_ids"]["prompt_token_ids"]:
            check(report["return_token_ids"]["prompt_token_ids"] == tk["tokens"],
                  "/tokenize ids == prompt_token_ids of the same chat")

        # --- developer role, reasoning field ---------------------------------------------------
        st, r5, _ = http(base, "/v1/chat/completions", {
            "model": a.model, "messages": [{"role": "developer", "content": "be brief"}, USER[1]],
            "temperature": 0, "max_tokens": 4})
        report["developer_role"] = {"status": st, "message": r5["choices"][0]["message"] if st == 200 else r5}

        # --- streaming forced tool call ----------------------------------------------------
        req = urllib.request.Request(base + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({**body1, "stream": True, "stream_options": {"include_usage": True}}).encode())
        chunks = []
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        report["stream"] = {"n_chunks": len(chunks), "first": chunks[0], "tool_call_chunks":
                            [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")][:3],
                            "last_two": chunks[-2:]}

        # --- /v1/responses (bonus) -----------------------------------------------------------
        st, r6, _ = http(base, "/v1/responses", {"model": a.model, "input": "hi", "max_output_tokens": 4, "temperature": 0})
        report["responses_api"] = {"status": st, "body": r6}

        # --- which server served: counters ------------------------------------------------------
        after_a, after_b = counters(a), counters(b)
        report["metrics_A_before_after"] = {k: [before_a[k], after_a[k]] for k in before_a}
        report["metrics_B_before_after"] = {k: [before_b[k], after_b[k]] for k in before_b}
        check(after_a["vllm:prefix_cache_hits_total"] > before_a["vllm:prefix_cache_hits_total"],
              "A: vllm:prefix_cache_hits_total rose")
        check(after_a["vllm:request_success_total"] > before_a["vllm:request_success_total"]
              and after_b["vllm:request_success_total"] == before_b["vllm:request_success_total"],
              "request_success_total tells which server served (A rose, B unchanged)")
        st, _, _ = http(b.base_url, "/v1/chat/completions", {"model": b.model, "messages": USER, "max_tokens": 2, "temperature": 0})
        check(st == 200 and counters(b)["vllm:request_success_total"] == before_b["vllm:request_success_total"] + 1,
              "B serves too and counts its request")
        report["metrics_names"] = sorted({line.split("{")[0].split(" ")[0] for line in a.metrics_text().splitlines()
                                          if line.startswith("vllm:")})
    finally:
        for s in servers.values():
            s.stop()
    out = sys.argv[1] if len(sys.argv) > 1 else str(logdir / "probe.json")
    Path(out).write_text(json.dumps(report, indent=1))
    print("report:", out, "| failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""simple_agent: call the model, run its tool calls against the resources server, repeat.

/v1/responses runs one episode and returns a Response whose `output` is every item of the
episode. /run = /seed_session -> episode -> /verify, all under one session id, then the
model's session is released. /aggregate_metrics (NeMo Gym's collector calls it at the end) goes
to the resources server when it has that route (NeMo Gym's do), else means are computed here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from nemo_gym_cli.serving import (GROUP_HEADER, HTTPError, InvalidRequest, RequestContext, ResponsesAPIAgent, ServerCallError,
                                  ServerConfig, ServerRef, check_header, last_assistant_text, new_session_id, require, route)

RELEASE_BATCH_S = 0.1  # finished sessions are released in batches: one call, not one per rollout


def _add_usage(total: dict | None, usage: dict | None) -> dict | None:
    """Sum token counts over the turns of an episode (nested *_details too)."""
    if not usage:
        return total
    if total is None:
        return orjson.loads(orjson.dumps(usage))
    for key, value in usage.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        elif isinstance(value, dict):
            total[key] = _add_usage(total.get(key) or {}, value)
    return total


# Fields of Responses create params the episode reads, and the JSON types each may have (None: absent or null).
NUMBER = (int, float)
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "input": (str, list), "tools": (list,), "instructions": (str,), "tool_choice": (str, dict), "model": (str,),
    "max_output_tokens": (int,), "temperature": NUMBER, "top_p": NUMBER, "parallel_tool_calls": (bool,),
    "metadata": (dict,),
}
TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer", bool: "true or false"}


def check_create_params(params: Any, where: str) -> dict:
    """The Responses create params an episode can run, or a 400 naming the field that is wrong."""
    if not isinstance(params, dict):
        raise HTTPError(400, f"{where}: must be a JSON object, got {type(params).__name__}")
    for key, types in PARAM_TYPES.items():
        value = params.get(key)
        wrong_bool = isinstance(value, bool) and bool not in types  # JSON true is not a number here
        if value is not None and (wrong_bool or not isinstance(value, types)):
            expected = "a number" if types == NUMBER else " or ".join(TYPE_NAMES[t] for t in types)
            raise HTTPError(400, f"{where}: field '{key}' must be {expected}, got {orjson.dumps(value)[:80].decode()}")
    for key in ("input", "tools"):
        items = params.get(key)
        for i, item in enumerate(items if isinstance(items, list) else ()):
            if not isinstance(item, dict):
                raise HTTPError(400, f"{where}: field '{key}[{i}]' must be an object, got {type(item).__name__}")
    return params


def _means(rows: list[dict]) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not key.startswith("_ng_"):
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
    return {f"mean/{key}": sums[key] / counts[key] for key in sums}


def mean_metrics(verify_responses: list) -> dict:
    """NeMo Gym's aggregate shape from the numeric fields of the verify responses: their means over
    all rollouts (agent_metrics) and per task (group_level_metrics); key_metrics: the reward's."""
    rows = [r for r in verify_responses if isinstance(r, dict)]
    tasks: dict[Any, list[dict]] = {}
    for row in rows:
        tasks.setdefault(row.get("_ng_task_index", 0), []).append(row)
    agent = _means(rows)
    key = {k: v for k, v in agent.items() if k == "mean/reward"}
    groups = [{"_ng_task_index": task, **_means(group)} for task, group in sorted(tasks.items(), key=lambda t: str(t[0]))]
    return {"agent_metrics": agent, "key_metrics": key, "group_level_metrics": groups}


@dataclass(kw_only=True)
class SimpleAgentConfig(ServerConfig):
    model_server: ServerRef  # the policy model
    resources_server: ServerRef  # the environment: its tools, /seed_session and /verify
    max_steps: int | None = None  # model turns per episode; null = until the model answers
    hard_step_cap: int = 100  # an episode that never ends (e.g. reasoning forever) stops here
    # After a turn with tool calls, send tool_choice "auto" instead of a forced one, so that
    # "call a tool first" does not become "call tools forever" (as the OpenAI Agents SDK does).
    reset_tool_choice: bool = False
    # The collector's pass@k counts a rollout of this agent as a pass when its reward is >= this.
    pass_threshold: float = 1.0


class SimpleAgent(ResponsesAPIAgent):
    config_type = SimpleAgentConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.model_server = cfg.model_server.name
        self.resources_server = cfg.resources_server.name
        self.max_steps = cfg.max_steps or None
        self.step_cap = min(self.max_steps or cfg.hard_step_cap, cfg.hard_step_cap)
        self.reset_tool_choice = cfg.reset_tool_choice
        self._to_release: list[str] = []
        self._release_task: asyncio.Task | None = None

    @route("/v1/responses")
    async def responses(self, body: Any, ctx: RequestContext) -> Any:
        body = check_create_params(body, "request body (Responses create params)")
        return await self._episode(body, ctx.session_id, ctx.headers.get(GROUP_HEADER) if ctx.headers else None)

    @route("/run")
    async def run(self, body: Any, ctx: RequestContext) -> Any:
        params = check_create_params(require(body, "responses_create_params", dict, where="dataset row"),
                                     "dataset row: responses_create_params")
        session_id = new_session_id()  # one rollout = one session
        group = body.get("_ng_task_index")
        group = None if group is None else f"{self.name}:{group}"
        if group is not None:
            try:  # it becomes the X-Group-ID header: a row must not be able to add headers of its own
                check_header(GROUP_HEADER, group)
            except InvalidRequest:
                raise HTTPError(400, "dataset row: field '_ng_task_index' contains CR, LF or NUL") from None
        try:
            await self._call(self.resources_server, "/seed_session", body, session_id)
            response = await self._episode(params, session_id, group)
            return await self._call(self.resources_server, "/verify", {**body, "response": response}, session_id)
        finally:
            self._to_release.append(session_id)
            if self._release_task is None:
                self._release_task = asyncio.create_task(self._release_batch(RELEASE_BATCH_S))

    async def _release_batch(self, delay: float) -> None:
        await asyncio.sleep(delay)  # let more rollouts finish: one call releases them all
        session_ids, self._to_release, self._release_task = self._to_release, [], None
        if not session_ids:
            return
        self.client.forget_sessions(session_ids)  # the cookies servers set for them
        try:
            # Every replica of the model: each forgets the sessions it holds.
            await self.client.post_each(self.model_server, "/release_session", {"session_ids": session_ids},
                                        retry_statuses=frozenset(), idempotent=True)
        except ServerCallError:
            pass  # best effort: the model's session table also expires idle sessions

    @route("/aggregate_metrics")
    async def aggregate_metrics(self, body: Any, ctx: RequestContext) -> Any:
        """`{verify_responses: [...]}` -> `{agent_metrics, key_metrics, group_level_metrics}`."""
        verify_responses = require(body, "verify_responses", list)
        try:
            return await self.client.post(self.resources_server, "/aggregate_metrics", body, idempotent=True)
        except ServerCallError as e:
            if e.status not in (404, 405):
                raise HTTPError(502, f"{self.name}: /aggregate_metrics on {self.resources_server} failed: {e.message}",
                                "upstream_error") from None
        return mean_metrics(verify_responses)

    async def on_shutdown(self) -> None:
        if self._release_task is not None:
            self._release_task.cancel()
            await self._release_batch(0)

    async def _call(self, server: str, path: str, body: Any, session_id: str | None, group: str | None = None,
                    idempotent: bool = False) -> Any:
        try:
            return await self.client.post(server, path, body, session_id=session_id,
                                          headers={GROUP_HEADER: group} if group else None, idempotent=idempotent)
        except ServerCallError as e:
            status = e.status if e.status and e.status >= 400 else 502
            raise HTTPError(status, f"{self.name}: {path} on {server} failed: {e.message}", e.error_type or "upstream_error") from None

    async def _episode(self, params: dict, session_id: str | None, group: str | None) -> dict:
        original_input = params.get("input", [])
        history = [{"role": "user", "content": original_input}] if isinstance(original_input, str) else list(original_input)
        tool_names = {t.get("name") for t in params.get("tools") or [] if isinstance(t, dict)}
        outputs: list[dict] = []
        usage = None
        response: dict = {}
        step_params = params
        for step in range(1, self.step_cap + 1):
            response = await self._call(self.model_server, "/v1/responses", {**step_params, "input": history + outputs},
                                        session_id, group, idempotent=True)  # inference: safe to repeat
            turn = response.get("output") or []
            outputs.extend(turn)
            usage = _add_usage(usage, response.get("usage"))
            calls = [item for item in turn if item.get("type") == "function_call"]
            if response.get("status") == "incomplete":
                break  # e.g. the context is full: end cleanly, verify what we have
            if not calls and last_assistant_text(turn):
                break
            for call in calls:
                outputs.append(await self._run_tool(call, tool_names, session_id))
            if calls and self.reset_tool_choice and params.get("tool_choice") not in (None, "auto", "none"):
                step_params = {**params, "tool_choice": "auto"}
            if self.max_steps and step >= self.max_steps:
                break
        return {**response, "output": outputs, "usage": usage}

    async def _run_tool(self, call: dict, tool_names: set, session_id: str | None) -> dict:
        """Run one function call; a bad call becomes a tool output the model can read."""
        name = call.get("name")
        result_text: str
        if tool_names and name not in tool_names:
            result_text = f"Error: unknown tool '{name}'. Available tools: {', '.join(sorted(map(str, tool_names)))}"
        else:
            try:
                args = orjson.loads(call.get("arguments") or "{}")
            except orjson.JSONDecodeError as e:
                args, result_text = None, f"Error: the arguments of '{name}' are not valid JSON ({e})"
            if args is not None:
                try:
                    result = await self.client.post(self.resources_server, f"/{name}", args, session_id=session_id)
                    result_text = orjson.dumps(result).decode()
                except ServerCallError as e:
                    if e.status is None or e.status >= 500:
                        raise HTTPError(502, f"{self.name}: tool '{name}' on {self.resources_server} failed: {e.message}",
                                        "upstream_error") from None
                    result_text = f"Error: {e.message}"  # 4xx: the model's mistake, it sees why
        return {"type": "function_call_output", "call_id": call.get("call_id"), "output": result_text}

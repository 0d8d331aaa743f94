"""math_verify: grade the model's last answer against the row's `expected_answer` with
HuggingFace's math-verify (parse the gold answer, parse the model's, verify(gold, answer)).

Grading runs in worker processes with a timeout per answer (grader.py); a grading problem is
reward 0.0 with the reason in `grading_error`, never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_gym_cli.serving import ServerConfig, SimpleResourcesServer, last_assistant_text, require, route

from resources_servers.math_verify.grader import GraderPool


@dataclass(kw_only=True)
class MathVerifyConfig(ServerConfig):
    """`workers` and `timeout_s` are listed with their defaults in configs/math_verify.yaml."""

    workers: int  # grading processes (sympy is CPU work, off the event loop)
    timeout_s: float  # per answer; a worker stuck longer is killed and replaced, reward 0.0
    inner_timeout_s: int | None = None  # math-verify's own parse/verify timeout inside a worker


class MathVerifyResourcesServer(SimpleResourcesServer):
    config_type = MathVerifyConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.workers < 1 or cfg.timeout_s <= 0:
            raise ValueError(f"server '{self.name}': workers must be >= 1 and timeout_s > 0, got {cfg.workers}, {cfg.timeout_s}")
        self.pool = GraderPool(workers=cfg.workers, timeout_s=cfg.timeout_s, inner_timeout_s=cfg.inner_timeout_s)

    async def on_startup(self) -> None:
        await self.pool.start()

    async def on_shutdown(self) -> None:
        self.pool.close()

    @route("/verify")
    async def verify(self, body, ctx):
        expected = require(body, "expected_answer", (str, int, float), where="math_verify row")
        answer = last_assistant_text((body.get("response") or {}).get("output"))
        if not answer:
            graded = {"reward": 0.0, "extracted_answer": None, "reason": "the response has no assistant text"}
        else:
            graded = await self.pool.grade(str(expected), answer)
        # a stored rollout sent again (ng_reverify) carries its old grade: replace all of it
        result = {k: v for k, v in body.items() if k != "grading_error"}
        result.update(reward=graded["reward"], extracted_answer=graded["extracted_answer"])
        if graded.get("reason"):
            result["grading_error"] = graded["reason"]
        return result

    @route("/grader_stats", "GET")
    async def grader_stats(self, body, ctx):
        pool = self.pool
        return {"workers": pool.size, "graded": pool.graded, "timeouts": pool.timeouts, "replaced": pool.replaced}

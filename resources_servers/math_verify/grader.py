"""Grading answers with HuggingFace's math-verify in worker processes, with a hard timeout.

Parsing and comparing with sympy is CPU work that a pathological answer (a tower of powers, a
10,000-term sum) can stretch to minutes, and some of it (big-integer arithmetic in C) cannot be
interrupted by a signal. So it never runs on the server's event loop: each answer goes to one
of `workers` processes; math-verify's own timeouts end most slow cases inside the worker, and
a worker that has not answered after `timeout_s` is killed and replaced. Either way the answer
gets reward 0.0 with the reason, and the other workers go on.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
from multiprocessing.connection import Connection

STARTUP_TIMEOUT_S = 120  # a fresh worker imports sympy and math-verify

# ------------------------------------------------------------ in the worker process


def grade(gold: str, answer: str, inner_timeout_s: int) -> dict:
    """{reward, extracted_answer, reason?} for one answer (runs in a worker)."""
    from math_verify import parse, verify

    try:
        text = gold if ("\\boxed" in gold or "$" in gold) else f"\\boxed{{{gold}}}"
        gold_parsed = parse(text, parsing_timeout=inner_timeout_s, raise_on_error=True)
        if not gold_parsed:
            return {"reward": 0.0, "extracted_answer": None, "reason": f"could not parse the expected answer {gold!r}"}
        parsed = parse(answer, parsing_timeout=inner_timeout_s, raise_on_error=True)
        if not parsed:
            return {"reward": 0.0, "extracted_answer": None, "reason": "no answer found in the response"}
        extracted = str(parsed[-1] if isinstance(parsed[-1], str) else parsed[0])
        ok = verify(gold_parsed, parsed, timeout_seconds=inner_timeout_s, raise_on_error=True)
        return {"reward": 1.0 if ok else 0.0, "extracted_answer": extracted}
    except BaseException as e:  # math-verify's TimeoutException is a BaseException on some versions
        return {"reward": 0.0, "extracted_answer": None, "reason": f"grading failed: {type(e).__name__}: {e}"[:500]}


def _worker_main(conn: Connection, inner_timeout_s: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import math_verify  # noqa: F401  (load sympy once, before the first answer)

    conn.send("ready")
    while True:
        try:
            gold, answer = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        conn.send(grade(gold, answer, inner_timeout_s))


# ------------------------------------------------------------ in the server


class Worker:
    def __init__(self, ctx, inner_timeout_s: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, inner_timeout_s), daemon=True, name="math_verify grader")
        self.proc.start()
        child.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(1)
        self.conn.close()


class GraderPool:
    def __init__(self, workers: int, timeout_s: float, inner_timeout_s: int | None = None):
        self.size = workers
        self.timeout_s = timeout_s
        self.inner_timeout_s = inner_timeout_s or max(1, int(timeout_s))
        self.ctx = multiprocessing.get_context("spawn")  # no fork of a process with an event loop and threads
        self.free: asyncio.Queue[Worker] = asyncio.Queue()
        self.all: list[Worker] = []
        self.graded = self.timeouts = self.replaced = 0
        self._replacing: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Start the workers and wait until each has loaded math-verify."""
        await asyncio.gather(*(self._add() for _ in range(self.size)))

    async def _add(self) -> None:
        worker = Worker(self.ctx, self.inner_timeout_s)
        self.all.append(worker)
        try:  # loading sympy takes about a second: not counted against any answer
            await asyncio.wait_for(self._receive(worker.conn), STARTUP_TIMEOUT_S)
        except (asyncio.TimeoutError, EOFError, OSError):
            self.all.remove(worker)
            worker.kill()
            raise RuntimeError(f"a math_verify grading worker did not start within {STARTUP_TIMEOUT_S} s") from None
        self.free.put_nowait(worker)

    def close(self) -> None:
        for task in self._replacing:
            task.cancel()
        for worker in self.all:
            worker.kill()
        self.all.clear()

    async def grade(self, gold: str, answer: str) -> dict:
        worker = await self.free.get()
        healthy = False
        try:
            worker.conn.send((gold, answer))
            result = await asyncio.wait_for(self._receive(worker.conn), self.timeout_s)
            healthy = True
            self.graded += 1
            return result
        except asyncio.TimeoutError:
            self.timeouts += 1
            return {"reward": 0.0, "extracted_answer": None, "reason": f"grading timed out after {self.timeout_s:g} s"}
        except (EOFError, OSError) as e:
            return {"reward": 0.0, "extracted_answer": None, "reason": f"grading worker died ({type(e).__name__})"}
        finally:
            if healthy:
                self.free.put_nowait(worker)
            else:  # stuck or dead: replace it, the answer it held is lost with it
                self.replaced += 1
                worker.kill()
                self.all.remove(worker)
                self._replacing.add(task := asyncio.ensure_future(self._add()))
                task.add_done_callback(self._replacing.discard)

    @staticmethod
    async def _receive(conn: Connection) -> dict:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = conn.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        return conn.recv()


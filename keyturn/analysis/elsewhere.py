"""Analysis of large statements in a separate process, off the gateway's event loop.

Walking the parse tree of a 250 KiB statement takes up to a second of CPU; on the event
loop that second is a second in which no other session is served, and a client pipelining
such statements would stall everyone. Gateways send texts beyond the event loop's
analysis budget (``LoopBudget``) here instead: the session waits (its later messages
stay in its backlog, in order) while a worker process parses and walks the text, then
goes on with the result.

Jobs wait in one queue per owner (the user), taken in turn, one job per worker at a
time: a user who sends many large statements from many sessions delays their own
statements, not everyone's. A job's time limit counts from when a worker starts it.

This module must fail closed: a worker that dies, or takes longer than ``timeout``, gives
an analysis with an error (UNKNOWN, the riskiest class) and is replaced; every waiting
caller gets an answer. It must not share state with the worker beyond the arguments:
what the worker returns is adopted only by the caller, which checks that the session's
prepared-statement names did not change meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from keyturn.analysis.postgres import Analysis, PreparedStatements, analyze_detached

log = logging.getLogger("keyturn.analysis")

Result = tuple[Analysis, bool, PreparedStatements | None, Any]


@dataclass
class _Job:
    args: tuple[Any, ...]
    sql: str
    done: asyncio.Future[Result] = field(repr=False)


class LoopBudget:
    """How much analysis the event loop may do in one of its iterations, for all sessions
    together (``analysis_cost`` units): beyond it texts go to the worker, so however many
    sessions send costly texts at once, the loop goes round within about ``limit`` units.

    A session's cheap texts (at most ``cheap`` each) are analysed on the loop anyway
    until the session itself spent ``own`` in the iteration, and the loop twice ``limit``
    (however many sessions send cheap texts at once): a session sending ordinary
    statements is not sent to wait behind others' jobs in the worker."""

    def __init__(self, limit: int, *, cheap: int, own: int) -> None:
        self.limit, self.cheap, self.own = limit, cheap, own
        self.spent = 0
        self._armed = False

    def take(self, cost: int, own_spent: int) -> bool:
        """Whether a text of ``cost`` is analysed here (its cost is then counted), given
        what its session spent in this iteration already."""
        if not self._armed:
            try:
                asyncio.get_running_loop().call_soon(self._reset)  # in the next iteration
                self._armed = True
            except RuntimeError:  # no loop running (a direct call): each call is a turn
                self.spent = 0
        if self.spent + cost <= self.limit or (cost <= self.cheap and own_spent < self.own
                                               and self.spent < 2 * self.limit):
            self.spent += cost
            return True
        return False

    def _reset(self) -> None:
        self.spent = 0
        self._armed = False


class AnalysisPool:
    """Worker processes (started on first use) that analyse texts, owners in turn."""

    def __init__(self, *, workers: int = 1, timeout: float = 30.0) -> None:
        self.workers = workers
        self.timeout = timeout
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._queues: dict[str, deque[_Job]] = {}
        self._turns: deque[str] = deque()  # owners with jobs waiting, in turn
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.analysed = 0  # texts analysed here (status and tests)

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fresh interpreter, never a fork of a process running an event loop
            # and threads.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def analyze(self, owner: str, unknown_function_class: str, sql: str,
                      prepared: PreparedStatements | None,
                      masked: list[str] | None = None) -> Result:
        """``analyze_detached`` in a worker: (analysis, cacheable by text, ``prepared``
        as the text changed it, what masking needs when ``masked``). ``prepared``
        itself is left alone."""
        job = _Job((unknown_function_class, sql, prepared, masked), sql,
                   asyncio.get_running_loop().create_future())
        queue = self._queues.get(owner)
        if queue is None:
            queue = self._queues[owner] = deque()
            self._turns.append(owner)
        queue.append(job)
        self._start()
        return await job.done  # a caller that gives up leaves the job to be skipped

    def _start(self) -> None:
        while self._running < self.workers and self._turns:
            owner = self._turns.popleft()
            queue = self._queues[owner]
            job = queue.popleft()
            if queue:
                self._turns.append(owner)  # its next job after the other owners'
            else:
                del self._queues[owner]
            if job.done.done():
                continue  # its caller went away (cancelled): nothing to do
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, job: _Job) -> None:
        try:
            result = await self._work(job)
        finally:
            self._running -= 1
            self._start()
        if not job.done.done():
            job.done.set_result(result)

    async def _work(self, job: _Job) -> Result:
        sql = job.sql
        pool = self._executor()
        try:
            fut = asyncio.get_running_loop().run_in_executor(pool, analyze_detached, *job.args)
            result: Result = await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            log.warning("analysis of a %d-character message took longer than %.0f s; "
                        "the worker is replaced", len(sql), self.timeout)
            self._replace(pool)
            return _failed(sql, f"analysis took longer than {self.timeout:.0f} s")
        except asyncio.CancelledError:
            if self._pool is None:  # closed while it ran
                return _failed(sql, "the gateway is stopping")
            raise
        except Exception as exc:  # a dead worker (BrokenProcessPool), pickling, OS errors
            log.error("the analysis worker failed (%s: %s); it is replaced",
                      type(exc).__name__, exc)
            self._replace(pool)
            return _failed(sql, f"analysis failed: {type(exc).__name__}")
        self.analysed += 1
        return result

    def _replace(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        """Kill ``pool``'s workers (one runs the job that failed; no other job was handed
        to it) and start afresh on the next job."""
        if self._pool is pool:
            self._pool = None
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            try:
                proc.kill()
            except Exception:  # already gone
                pass
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers; every caller still waiting gets a failed analysis."""
        for queue in self._queues.values():
            for job in queue:
                if not job.done.done():
                    job.done.set_result(_failed(job.sql, "the gateway is stopping"))
        self._queues.clear()
        self._turns.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _failed(sql: str, why: str) -> Result:
    return Analysis(sql, (), why), False, None, None

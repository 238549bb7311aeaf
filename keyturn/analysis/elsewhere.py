"""Analysis of large statements in a separate process, off the gateway's event loop.

Walking the parse tree of a 250 KiB statement takes up to a second of CPU; on the event
loop that second is a second in which no other session is served, and a client pipelining
such statements would stall everyone. Gateways send texts above their per-turn budget
here instead: the session waits (its later messages stay in its backlog, in order) while
one worker process parses and walks the text, then goes on with the result.

This module must fail closed: a worker that dies, or takes longer than ``timeout``, gives
an analysis with an error (UNKNOWN, the riskiest class) and is replaced. It must not share
state with the worker beyond the arguments: what the worker returns is adopted only by the
caller, which checks that the session's prepared-statement names did not change meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import pickle
from concurrent.futures.process import BrokenProcessPool

from keyturn.analysis.postgres import Analysis, PreparedStatements, analyze_detached

log = logging.getLogger("keyturn.analysis")


class AnalysisPool:
    """One worker process (started on first use) that analyses texts in turn."""

    def __init__(self, *, workers: int = 1, timeout: float = 30.0) -> None:
        self.workers = workers
        self.timeout = timeout
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.analysed = 0  # texts analysed here (status and tests)

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fresh interpreter, never a fork of a process running an event loop
            # and threads.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def analyze(self, unknown_function_class: str, sql: str,
                      prepared: PreparedStatements | None
                      ) -> tuple[Analysis, bool, PreparedStatements | None]:
        """``analyze_detached`` in the worker: (analysis, cacheable by text, ``prepared``
        as the text changed it). ``prepared`` itself is left alone."""
        loop = asyncio.get_running_loop()
        pool = self._executor()
        try:
            fut = loop.run_in_executor(pool, analyze_detached, unknown_function_class, sql,
                                       prepared)
            result = await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            log.warning("analysis of a %d-character message took longer than %.0f s; "
                        "the worker is replaced", len(sql), self.timeout)
            self._replace(pool)
            return Analysis(sql, (), f"analysis took longer than {self.timeout:.0f} s"), \
                False, None
        except (BrokenProcessPool, pickle.PicklingError, OSError, EOFError) as exc:
            log.error("the analysis worker failed (%s); it is replaced", exc)
            self._replace(pool)
            return Analysis(sql, (), f"analysis failed: {type(exc).__name__}"), False, None
        self.analysed += 1
        return result

    def _replace(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
        for proc in list(getattr(pool, "_processes", {}).values()):
            try:
                proc.kill()
            except Exception:  # already gone
                pass
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

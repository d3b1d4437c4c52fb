"""One generation at a time per model: a bounded waiting line in front of one worker thread.

``SpeculativeGenerator`` is not re-entrant and generation is CPU-bound, so a single worker runs the requests one
after the other while the event loop keeps answering HTTP. The worker is a thread of its own (``start``) or the
caller's thread (``run_forever``). ``falconspec serve`` runs it on the main thread, which loaded the model: a second
thread doing torch work brings a second OpenMP thread team, and once a process has more OpenMP threads than CPUs
GNU OpenMP stops spin-waiting between parallel regions, which made every few-row product (a verification forward)
~3x slower on 2 cores (one-token steps use no parallel region and were unaffected). Admission is decided up front: with
``max_queue = 2`` one request runs and two wait; a fourth concurrent request is refused (``QueueFullError``,
a 429 to the client) instead of waiting without bound.

The worker hands each ``StreamChunk`` to the request's coroutine through an ``asyncio.Queue`` on the event loop.
Cancelling a job (its client went away, or its deadline passed) removes it from the waiting line, or, if it is
running, stops the generation after the cycle in progress and frees the worker for the next request. A job past its
deadline (``request_timeout`` seconds after admission) ends with ``RequestTimeoutError``; on shutdown the running
job ends with ``ShuttingDownError`` and the waiting ones are refused with it. Every cancellation is logged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from ..generate import SpeculativeGenerator, StreamChunk
from ..metrics import SpecStats

log = logging.getLogger(__name__)

_FINISHED = object()  # end-of-job marker on a job's event queue


class QueueFullError(RuntimeError):
    """Every running and waiting slot is taken."""


class ShuttingDownError(QueueFullError):
    """The server is stopping: the job was refused, or stopped before it finished."""


class RequestTimeoutError(RuntimeError):
    """The job's deadline passed before it finished."""


class JobObserver(Protocol):
    """What the scheduler reports while it works (implemented by ``ServerMetrics``)."""

    def job_started(self, queue_seconds: float) -> None: ...

    def job_chunk(self, chunk: StreamChunk, since_submit: float, first: bool) -> None: ...

    def job_finished(self, outcome: str, stats: SpecStats | None, since_submit: float) -> None: ...


@dataclass(eq=False)  # identity equality: a job is removed from the waiting line by identity
class Job:
    """One request's generation: its ``SpeculativeGenerator.stream`` arguments and its way back to the loop."""

    stream_kwargs: dict
    loop: asyncio.AbstractEventLoop
    request_id: str = "-"
    timeout: float | None = None  # seconds from submission
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # StreamChunk, Exception, then _FINISHED
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled"  # why it was cancelled: "cancelled" (client gone), "timeout" or "shutdown"
    done: threading.Event = field(default_factory=threading.Event)  # set once the worker is through with it
    submitted: float = field(default_factory=time.perf_counter)

    def push(self, item: object) -> None:
        """Hand ``item`` to the request's coroutine (thread-safe); a closed event loop cancels the job."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()


class Scheduler:
    """Runs jobs one at a time on a worker thread; at most ``max_queue`` jobs wait behind the running one."""

    def __init__(self, generator: SpeculativeGenerator, max_queue: int, observer: JobObserver | None = None):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0 (requests waiting behind the running one), "
                             f"got {max_queue!r}")
        self.generator = generator
        self.max_queue = max_queue
        self.observer = observer
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- state
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return 0 if self._running is None else 1

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        self._thread = threading.Thread(target=self._work, name="falconspec-generation", daemon=True)
        self._thread.start()

    def run_forever(self) -> None:
        """Be the worker in the calling thread until :meth:`stop` (instead of :meth:`start`)."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        self._work()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones, stop the running one (``ShuttingDownError``) and wait for the
        worker. Safe to call more than once, from any thread."""
        with self._cond:
            first = not self._stopping
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            running = self._running
            if running is not None:
                running.reason = "shutdown"
                running.cancelled.set()
            self._cond.notify_all()
        if first:
            log.info("scheduler stopping: %s, %d waiting request(s) refused",
                     f"stopping request {running.request_id}" if running else "nothing running", len(waiting))
        for job in waiting:
            job.push(ShuttingDownError("the server is shutting down"))
            job.push(_FINISHED)
            job.done.set()
            self._report_finished(job, "shutdown", None)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the request side (event loop)
    def submit(self, stream_kwargs: dict, request_id: str = "-", timeout: float | None = None) -> Job:
        """Admit a job or raise ``QueueFullError``. Call from the event loop: the job reports back to it.

        ``timeout``: seconds from now until the job is given up (``RequestTimeoutError``); None = no deadline."""
        job = Job(stream_kwargs, asyncio.get_running_loop(), request_id, timeout)
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            in_flight = self.num_running + len(self._waiting)
            if in_flight >= 1 + self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {in_flight} requests are running or waiting and the queue holds "
                    f"{self.max_queue} (--max-queue); retry later"
                )
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Give up on a job: drop it from the waiting line, or stop it after the current cycle."""
        if job.done.is_set() or job.cancelled.is_set():
            return
        job.reason = reason
        job.cancelled.set()
        with self._cond:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
                job.push(_FINISHED)
                job.done.set()
                self._report_finished(job, reason, None)
        log.info("request %s %s while %s", job.request_id, "timed out" if reason == "timeout" else reason,
                 "waiting" if waiting else "generating (it stops after the current cycle)")

    async def results(self, job: Job) -> AsyncIterator[StreamChunk]:
        """The job's chunks as the worker produces them; leaving early (or being cancelled) cancels the job.

        Raises ``RequestTimeoutError`` once the job's deadline has passed (and cancels the job)."""
        finished = False
        deadline = None if job.timeout is None else job.submitted + job.timeout
        try:
            while True:
                if deadline is None:
                    item = await job.events.get()
                else:
                    try:
                        item = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.perf_counter()))
                    except asyncio.TimeoutError:
                        self.cancel(job, "timeout")
                        raise RequestTimeoutError(
                            f"the request did not finish within {job.timeout:g} s of its arrival (queue wait "
                            "included; --request-timeout)") from None
                if item is _FINISHED:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not finished:
                self.cancel(job)

    # ---------------------------------------------------------------- the worker thread
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
                job.done.set()

    def _run(self, job: Job) -> None:
        if self.observer is not None:
            self.observer.job_started(time.perf_counter() - job.submitted)
        outcome, stats = "cancelled", None
        stream = self.generator.stream(**job.stream_kwargs)
        try:
            first = True
            for chunk in stream:
                job.push(chunk)
                if self.observer is not None:
                    self.observer.job_chunk(chunk, time.perf_counter() - job.submitted, first)
                first = False
                if chunk.finish_reason is not None:
                    outcome, stats = chunk.finish_reason, chunk.stats
                elif job.cancelled.is_set():  # checked between cycles: the client is gone, or time is up
                    outcome = job.reason
                    log.info("request %s: generation stopped (%s)", job.request_id, job.reason)
                    if job.reason == "shutdown":
                        job.push(ShuttingDownError("the server is shutting down: the generation was stopped "
                                                   "before it finished"))
                    break
        except Exception as err:  # reported to the request; the worker carries on with the next job
            log.exception("request %s: generation failed", job.request_id)
            outcome = "error"
            job.push(err)
        finally:
            stream.close()  # releases the generator's busy lock when we stopped early
        job.push(_FINISHED)
        self._report_finished(job, outcome, stats)

    def _report_finished(self, job: Job, outcome: str, stats: SpecStats | None) -> None:
        if self.observer is not None:
            self.observer.job_finished(outcome, stats, time.perf_counter() - job.submitted)

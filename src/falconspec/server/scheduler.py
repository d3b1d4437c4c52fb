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
Cancelling a job (its client went away) removes it from the waiting line, or, if it is running, stops the
generation after the cycle in progress and frees the worker for the next request.
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
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # StreamChunk, Exception, then _FINISHED
    cancelled: threading.Event = field(default_factory=threading.Event)
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
        """Refuse new jobs, fail the waiting ones, cancel the running one and wait for the worker."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        for job in waiting:
            job.push(QueueFullError("the server is shutting down"))
            job.push(_FINISHED)
            job.done.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the request side (event loop)
    def submit(self, stream_kwargs: dict) -> Job:
        """Admit a job or raise ``QueueFullError``. Call from the event loop: the job reports back to it."""
        job = Job(stream_kwargs, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            in_flight = self.num_running + len(self._waiting)
            if in_flight >= 1 + self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {in_flight} requests are running or waiting and the queue holds "
                    f"{self.max_queue} (--max-queue); retry later"
                )
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Give up on a job: drop it from the waiting line, or stop it after the current cycle."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.push(_FINISHED)
                job.done.set()
                self._report_finished(job, "cancelled", None)

    async def results(self, job: Job) -> AsyncIterator[StreamChunk]:
        """The job's chunks as the worker produces them; leaving early (or being cancelled) cancels the job."""
        finished = False
        try:
            while True:
                item = await job.events.get()
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
                elif job.cancelled.is_set():  # checked between cycles: the client is gone
                    break
        except Exception as err:  # reported to the request; the worker carries on with the next job
            log.exception("generation failed")
            outcome = "error"
            job.push(err)
        finally:
            stream.close()  # releases the generator's busy lock when we stopped early
        job.push(_FINISHED)
        self._report_finished(job, outcome, stats)

    def _report_finished(self, job: Job, outcome: str, stats: SpecStats | None) -> None:
        if self.observer is not None:
            self.observer.job_finished(outcome, stats, time.perf_counter() - job.submitted)

"""Continuous batching: a bounded waiting line in front of a batch of sequences stepped by one worker.

The worker drives a batch engine with the ``BatchGenerator`` interface (batch.py): ``add`` a request, ``step()`` one
cycle of every active sequence, ``cancel`` one. Requests join the running batch at cycle boundaries, as long as fewer than ``max_batch`` sequences are active, and leave it when they
finish; the others wait in arrival order. Admission is decided up front: a request arriving while ``max_batch +
max_queue`` requests are running or waiting is refused (``QueueFullError``, a 429 to the client) instead of waiting
without bound. With ``max_batch = 1`` this is the one-request-at-a-time server.

The engine is called from the worker only (it is not thread-safe), and generation is CPU-bound. The worker is a
thread of its own (``start``) or the caller's thread (``run_forever``). ``falconspec serve`` runs it on the main
thread, which loaded the model: a second thread doing torch work brings a second OpenMP thread team, and once a
process has more OpenMP threads than CPUs GNU OpenMP stops spin-waiting between parallel regions, which made every
few-row product (a verification forward) ~3x slower on 2 cores (one-token steps use no parallel region and were
unaffected).

The worker hands each ``StreamChunk`` to the request's coroutine through an ``asyncio.Queue`` on the event loop.
Cancelling a job (its client went away, or its deadline passed) removes it from the waiting line, or, if it is in the
batch, takes it out (``batch.cancel``) at the next cycle boundary, before any new request joins: the slot is free for
the next waiting request at once. A job past its deadline (``request_timeout`` seconds after admission) ends with
``RequestTimeoutError``; on shutdown the running jobs end with ``ShuttingDownError`` and the waiting ones are refused
with it. An error from ``batch.add`` (an invalid request) fails that job alone; an error from ``batch.step()`` fails
the jobs of that step (they are cancelled) and the worker carries on with the rest. Every cancellation is logged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from typing import Protocol

from ..batch import BatchFullError
from ..generate import StreamChunk
from ..metrics import SpecStats

log = logging.getLogger(__name__)

_FINISHED = object()  # end-of-job marker on a job's event queue


class QueueFullError(RuntimeError):
    """Every running and waiting slot is taken."""


class ShuttingDownError(QueueFullError):
    """The server is stopping: the job was refused, or stopped before it finished."""


class RequestTimeoutError(RuntimeError):
    """The job's deadline passed before it finished."""


class BatchEngine(Protocol):
    """What the scheduler needs of an engine: the ``BatchGenerator`` interface of batch.py."""

    max_batch: int

    @property
    def active(self) -> int: ...

    def add(self, **stream_kwargs) -> Hashable: ...

    def cancel(self, seq_id: Hashable) -> None: ...

    def step(self) -> dict[Hashable, StreamChunk]: ...


class JobObserver(Protocol):
    """What the scheduler reports while it works (implemented by ``ServerMetrics``)."""

    def job_started(self, queue_seconds: float) -> None:
        """A job joined the batch ``queue_seconds`` after its admission."""

    def job_chunk(self, chunk: StreamChunk, since_submit: float, first: bool) -> None: ...

    def job_finished(self, outcome: str, stats: SpecStats | None, since_submit: float) -> None: ...

    def batch_step(self, size: int, seconds: float) -> None:
        """One cycle of ``size`` sequences took ``seconds``."""


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
    seq_id: Hashable | None = None  # its sequence in the batch, once it joined
    chunks: int = 0  # chunks handed over so far

    def push(self, item: object) -> None:
        """Hand ``item`` to the request's coroutine (thread-safe); a closed event loop cancels the job."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()


class Scheduler:
    """Runs jobs in a batch of at most ``max_batch`` on one worker; at most ``max_queue`` more wait for a place."""

    def __init__(self, batch: BatchEngine, max_queue: int, observer: JobObserver | None = None,
                 max_batch: int | None = None):
        """``max_batch``: sequences run at once (default: ``batch.max_batch``; at most that)."""
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0 (requests waiting for a place in the batch), "
                             f"got {max_queue!r}")
        engine_max = getattr(batch, "max_batch", None)
        max_batch = engine_max if max_batch is None else max_batch
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if engine_max is not None and max_batch > engine_max:
            raise ValueError(f"max_batch {max_batch} is more than the engine holds ({engine_max})")
        self.batch = batch
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.observer = observer
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._joining: list[Job] = []  # taken from the waiting line, being added to the batch
        self._running: dict[Hashable, Job] = {}  # seq_id -> job, in the batch
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- state
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._joining)

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
        """Refuse new jobs, fail the waiting ones, stop the running ones (``ShuttingDownError``) and wait for the
        worker. Safe to call more than once, from any thread."""
        with self._cond:
            first = not self._stopping
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            running = [*self._running.values(), *self._joining]
            for job in running:
                job.reason = "shutdown"
                job.cancelled.set()
            self._cond.notify_all()
        if first:
            log.info("scheduler stopping: %s, %d waiting request(s) refused",
                     f"stopping {len(running)} running request(s) "
                     f"({', '.join(job.request_id for job in running)})" if running else "nothing running",
                     len(waiting))
        for job in waiting:
            job.push(ShuttingDownError("the server is shutting down"))
            self._finish(job, "shutdown", None)
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
            if in_flight >= self.max_batch + self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {in_flight} requests are running or waiting; it runs {self.max_batch} "
                    f"at once (--max-batch) and {self.max_queue} may wait (--max-queue); retry later"
                )
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Give up on a job: drop it from the waiting line, or take it out of the batch at the next cycle boundary."""
        if job.done.is_set() or job.cancelled.is_set():
            return
        job.reason = reason
        job.cancelled.set()
        with self._cond:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
                self._finish(job, reason, None)
            self._cond.notify()
        log.info("request %s %s while %s", job.request_id, "timed out" if reason == "timeout" else reason,
                 "waiting" if waiting else "generating (it leaves the batch at the next cycle boundary)")

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

    # ---------------------------------------------------------------- the worker
    def _work(self) -> None:
        """Cycle after cycle: take cancelled jobs out, let waiting ones join, step the batch."""
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._stopping:
                    self._cond.wait()
                stopping = self._stopping
            if stopping:
                self._leave(everyone=True)
                return
            self._leave()  # first free the slots of cancelled jobs ...
            with self._cond:  # ... then fill them, in arrival order
                while self._waiting and len(self._running) + len(self._joining) < self.max_batch:
                    self._joining.append(self._waiting.popleft())
                joining = list(self._joining)
            for job in joining:
                self._join(job)
            self._leave()  # jobs cancelled while they were joining
            if self._running:
                self._step()

    def _join(self, job: Job) -> None:
        """Add ``job`` to the batch; a request the engine refuses fails alone."""
        seq_id, error = None, None
        if not job.cancelled.is_set():
            try:
                seq_id = self.batch.add(**job.stream_kwargs)
            except BatchFullError as err:  # the engine holds fewer sequences than it should: wait for a place
                if self._running:
                    log.warning("request %s: the batch is full (%s): it waits for the next cycle", job.request_id, err)
                    with self._cond:
                        self._joining.remove(job)
                        self._waiting.appendleft(job)
                    return
                error = err
            except Exception as err:  # an invalid request (RequestError: a 400), or a broken engine
                error = err
        with self._cond:
            self._joining.remove(job)
            if seq_id is not None:
                job.seq_id = seq_id
                self._running[seq_id] = job
        if error is not None:
            if isinstance(error, ValueError):
                log.info("request %s refused by the batch: %s", job.request_id, error)
            else:
                log.error("request %s: could not join the batch", job.request_id, exc_info=error)
            job.push(error)
            self._finish(job, "error", None)
        elif seq_id is None:  # cancelled before it joined
            self._stopped(job)
        elif self.observer is not None:
            self.observer.job_started(time.perf_counter() - job.submitted)

    def _leave(self, everyone: bool = False) -> None:
        """Take the cancelled jobs (``everyone``: all jobs) out of the batch; their slots are free at once."""
        with self._cond:
            leaving = [(seq_id, job) for seq_id, job in self._running.items() if everyone or job.cancelled.is_set()]
            for seq_id, _ in leaving:
                del self._running[seq_id]
        for seq_id, job in leaving:
            self._cancel_sequence(seq_id, job)
            if everyone and not job.cancelled.is_set():
                job.reason = "shutdown"
            self._stopped(job)

    def _stopped(self, job: Job) -> None:
        log.info("request %s: generation stopped (%s)", job.request_id, job.reason)
        if job.reason == "shutdown":
            job.push(ShuttingDownError("the server is shutting down: the generation was stopped before it finished"))
        self._finish(job, job.reason, None)

    def _step(self) -> None:
        """One cycle of the batch; its chunks go to their jobs, finished jobs leave."""
        with self._cond:
            stepping = dict(self._running)
        start = time.perf_counter()
        try:
            chunks = self.batch.step()
        except Exception as err:  # fails this step's jobs; the worker carries on with the next requests
            log.exception("a batch step failed: its %d request(s) (%s) fail", len(stepping),
                          ", ".join(job.request_id for job in stepping.values()))
            with self._cond:
                for seq_id in stepping:
                    self._running.pop(seq_id, None)
            for seq_id, job in stepping.items():
                self._cancel_sequence(seq_id, job)
                job.push(err)
                self._finish(job, "error", None)
            return
        now = time.perf_counter()
        if self.observer is not None:
            self.observer.batch_step(len(stepping), now - start)
        for seq_id, chunk in chunks.items():
            job = stepping.get(seq_id)
            if job is None:
                log.warning("the batch returned a chunk of an unknown sequence %r: ignored", seq_id)
                continue
            job.push(chunk)
            if self.observer is not None:
                self.observer.job_chunk(chunk, now - job.submitted, job.chunks == 0)
            job.chunks += 1
            if chunk.finish_reason is not None:  # its last chunk: the sequence has left the batch
                with self._cond:
                    self._running.pop(seq_id, None)
                self._finish(job, chunk.finish_reason, chunk.stats)

    def _cancel_sequence(self, seq_id: Hashable, job: Job) -> None:
        try:
            self.batch.cancel(seq_id)
        except Exception:  # the job ends anyway; the engine's state is its own business
            log.exception("request %s: cancelling its sequence failed", job.request_id)

    def _finish(self, job: Job, outcome: str, stats: SpecStats | None) -> None:
        job.push(_FINISHED)
        job.done.set()
        if self.observer is not None:
            self.observer.job_finished(outcome, stats, time.perf_counter() - job.submitted)

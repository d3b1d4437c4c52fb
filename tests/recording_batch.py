"""The real ``batch.BatchGenerator`` for the server's tests, recording what the scheduler asks of it and misbehaving
on demand."""

from __future__ import annotations

import threading

from falconspec.request import RequestError
from falconspec.batch import BatchGenerator


class StepFailure(RuntimeError):
    """The fault ``RecordingBatchGenerator.fail_at_size`` injects."""


class RecordingBatchGenerator(BatchGenerator):
    def __init__(self, target, drafter, max_batch: int = 4):
        super().__init__(target, drafter, planner=None, max_batch=max_batch)
        self.added: list[int] = []  # seq ids, in the order they joined
        self.cancelled: list[int] = []  # seq ids the scheduler cancelled (finished sequences leave by themselves)
        self.step_sizes: list[int] = []  # active sequences at each step
        self.open = threading.Event()  # clear it to hold the worker at the start of its next step
        self.open.set()
        self.fail_at_size: int | None = None  # the next step with this many sequences raises StepFailure
        self.refused_seed: int | None = None  # add() refuses requests with this seed (RequestError)

    def add(self, **kwargs) -> int:
        if self.refused_seed is not None and kwargs.get("seed") == self.refused_seed:
            raise RequestError(f"seed {self.refused_seed} is refused by the fake batch", "seed")
        seq_id = super().add(**kwargs)
        self.added.append(seq_id)
        return seq_id

    def cancel(self, seq_id: int) -> None:
        if seq_id in self._joining or seq_id in self._decoding:
            self.cancelled.append(seq_id)
        super().cancel(seq_id)

    def step(self):
        assert self.open.wait(60), "the test never let the fake batch step"
        if self.fail_at_size is not None and self.active == self.fail_at_size:
            self.fail_at_size = None
            raise StepFailure("injected step failure: secret detail /etc/shadow")
        self.step_sizes.append(self.active)
        return super().step()

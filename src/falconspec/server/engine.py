"""``InterleavedBatch``: the ``BatchGenerator`` interface (see batch.py) over per-sequence ``SpeculativeGenerator`` streams.

The scheduler drives an engine through ``add`` / ``cancel`` / ``step`` / ``active`` / ``max_batch``. This one runs no
batched forward: ``step()`` advances every active sequence by one chunk of its own ``SpeculativeGenerator.stream``,
one sequence after the other, so its throughput is one sequence's. It is what the server runs with ``max_batch = 1``
(exactly the one-request-at-a-time server: one generator, one stream) and, until ``batch.BatchGenerator`` is
implemented, with more (requests then take turns cycle by cycle instead of waiting for each other to finish).

Each slot has a generator of its own (a ``SpeculativeGenerator`` decodes one sequence at a time and its planner
follows that sequence); the slots share the target, the drafter and the calibration. Call it from one thread.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator

from ..batch import BatchFullError
from ..drafters.base import Drafter
from ..generate import SpeculativeGenerator, StreamChunk
from ..planner import BudgetPlanner
from ..request import check_budget, check_input_ids, check_request
from ..target import TargetModel


class InterleavedBatch:
    """Up to ``max_batch`` sequences, each stepped through its own ``SpeculativeGenerator.stream`` in turn."""

    def __init__(self, target: TargetModel, drafter: Drafter | None = None, planner: BudgetPlanner | str | None = "auto",
                 matmul_path: str | None = None, max_batch: int = 8):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.target, self.drafter = target, drafter
        self.planner, self.matmul_path, self.max_batch = planner, matmul_path, max_batch
        self._free: list[SpeculativeGenerator] = []  # generators of finished sequences, reused by the next ones
        self._first: SpeculativeGenerator | None = None  # the first generator made: its calibration plans the others
        self._streams: dict[int, tuple[SpeculativeGenerator, Iterator[StreamChunk]]] = {}  # in joining order
        self._ids = itertools.count()

    @classmethod
    def from_generator(cls, generator: SpeculativeGenerator, max_batch: int = 1,
                       matmul_path: str | None = None) -> InterleavedBatch:
        """``generator`` as the first slot, further slots like it (``matmul_path``: theirs). ``max_batch = 1``:
        ``generator`` alone, one sequence at a time, the one-request-at-a-time server."""
        batch = cls(generator.target, generator.drafter, planner=generator.planner, matmul_path=matmul_path,
                    max_batch=max_batch)
        batch._free, batch._first = [generator], generator
        return batch

    @property
    def active(self) -> int:
        return len(self._streams)

    def add(self, prompt: str | None = None, **kwargs) -> int:
        """Check the request (``RequestError`` at once, as ``SpeculativeGenerator.stream`` would) and give it a slot;
        ``BatchFullError`` when ``max_batch`` sequences are active. Its first chunk comes from the next ``step()``."""
        if len(self._streams) >= self.max_batch:
            raise BatchFullError(f"{self.max_batch} sequences are active (max_batch)")
        request = check_request(prompt, kwargs.get("messages"), kwargs.get("input_ids"),
                                **{k: v for k, v in kwargs.items() if k not in ("messages", "input_ids")})
        if request.input_ids is not None:
            prompt_len = len(check_input_ids(request.input_ids, self.target.vocab_size))
        else:
            prompt_len = len(check_input_ids(self.target.encode(request.prompt, request.messages), param="prompt"))
        check_budget(prompt_len, request.max_new_tokens, self.target.max_context)
        generator = self._free.pop() if self._free else self._new_generator()
        seq_id = next(self._ids)
        self._streams[seq_id] = (generator, generator.stream(prompt, **kwargs))
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """End a sequence now and free its slot; unknown (or finished) ids are ignored."""
        entry = self._streams.pop(seq_id, None)
        if entry is not None:
            self._release(*entry)

    def step(self) -> dict[int, StreamChunk]:
        """One chunk from every active sequence, in joining order; finished sequences leave. An error from a
        sequence's stream ends that sequence and propagates (the other sequences stay active)."""
        chunks = {}
        for seq_id, (generator, stream) in list(self._streams.items()):
            try:
                chunk = next(stream)
            except BaseException:
                self.cancel(seq_id)
                raise
            chunks[seq_id] = chunk
            if chunk.finish_reason is not None:
                self.cancel(seq_id)
        return chunks

    def _release(self, generator: SpeculativeGenerator, stream: Iterator[StreamChunk]) -> None:
        stream.close()  # releases the generator's busy lock if the stream stopped early
        self._free.append(generator)

    def _new_generator(self) -> SpeculativeGenerator:
        planner = self.planner
        if self._first is not None and self._first.planner is not None:
            # a planner follows one sequence: every slot plans with its own, from the one calibration
            if self._first.calibration is not None:
                planner = self._first.calibration.planner(self.target, self._first.drafter, self.matmul_path)
            else:
                planner = copy.deepcopy(self._first.planner)
        generator = SpeculativeGenerator(self.target, self.drafter, planner=planner, matmul_path=self.matmul_path)
        self._first = self._first or generator
        return generator

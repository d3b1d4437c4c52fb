"""Batched speculative decoding: B sequences, each with its own tree, verified in one target forward.

The API (the server's continuous batching is written against it)::

    batch = BatchGenerator(target, drafter, planner="auto", matmul_path=None, max_batch=8)
    seq_id = batch.add(prompt=None, messages=None, input_ids=None, max_new_tokens=128, stop=None,
                       temperature=0.0, top_p=1.0, top_k=0, seed=None, ignore_eos=False)
        # the same arguments as SpeculativeGenerator.stream; validated at once (RequestError, a ValueError, before
        # any state changes); raises BatchFullError when max_batch sequences are active. The sequence is prefilled
        # at the next step() and joins the batch at that cycle boundary.
    batch.cancel(seq_id)          # leaves the batch at once, its slot free for the next add(); unknown ids: no-op
    chunks = batch.step()         # one cycle for every active sequence: dict seq_id -> StreamChunk (only the
                                  # sequences that produced text or finished; a chunk with finish_reason set is
                                  # that sequence's last, and it has left the batch)
    batch.active                  # number of active sequences (added, not finished or cancelled)
    batch.generate(requests)      # convenience: list of stream-kwargs dicts -> list[GenerationResult], in order

One step: the sequences added since the last step are prefilled (one by one), every sequence proposes its tree with
its own drafter state (one sequence at a time), one :meth:`~.target.TargetModel.forward_trees` verifies all the
trees, and each sequence accepts its rows. Every sequence is a :class:`~.generate.SequenceDecoder`, the same code as
the solo loop, so greedy output of each sequence is identical to that sequence decoded alone by
:class:`~.generate.SpeculativeGenerator` (fp32), and a seeded sampled sequence with the same trees (a fixed budget)
draws exactly the same tokens.

Budgets: each sequence has a planner of its own (it follows that sequence's acceptance). The forward runs every row
of the batch, so with ``planner="auto"`` a sequence's planner sees its share of the cost: ``c(B * n) / B`` for a tree
of ``n`` nodes in a batch of ``B`` (:meth:`~.calibrate.Calibration.verify_cost`), updated whenever ``B`` changes.
Trees are padded to the largest in the forward, so the batch drafts with one budget for all its sequences, the one
with the most expected tokens per second over the batch (:func:`~.planner.batch_plan`). A given :class:`~.planner.BudgetPlanner` is copied for each sequence and used with its own costs as given; None
leaves the drafter's budget as it is.

The methods are serialized by a lock: ``add`` and ``cancel`` from other threads wait for a running ``step``.
"""

from __future__ import annotations

import copy
import threading
import time
import typing
from typing import Callable

from .calibrate import for_generation
from .drafters.base import Drafter, NoDrafter
from .generate import GenerationResult, SequenceDecoder, StreamChunk, check_stream_request, collect, elapsed_since
from .planner import BudgetPlanner, Plan, batch_plan
from .target import TargetModel
from .tree import Tree


class BatchFullError(RuntimeError):
    """``max_batch`` sequences are already active."""


class BatchGenerator:
    """Lossless speculative generation of up to ``max_batch`` sequences at once, one target forward per cycle for
    all of them; sequences join and leave at cycle boundaries."""

    def __init__(self, target: TargetModel, drafter: Drafter | None = None,
                 planner: BudgetPlanner | str | None = "auto", matmul_path: str | None = None, max_batch: int = 8):
        """``planner`` and ``matmul_path`` as for :class:`~.generate.SpeculativeGenerator` (see the module
        docstring for how a batch plans); ``max_batch``: the most sequences active at once."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.target, self.drafter = target, drafter or NoDrafter()
        self.matmul_path, self.max_batch = matmul_path, max_batch
        self.calibration = for_generation(target, self.drafter, planner, matmul_path)  # and the product paths
        self._template: BudgetPlanner | None = None  # a planner given by the caller, copied per sequence
        if self.drafter.planned and not isinstance(self.drafter, NoDrafter) and planner is not None:
            if self.calibration is not None:
                self.calibration.planner(target, self.drafter, matmul_path)  # calibrates the drafter once if needed
            elif isinstance(planner, BudgetPlanner):
                self._template = planner
            else:
                raise ValueError(f"planner must be 'auto', a BudgetPlanner or None, got {planner!r}")
        # called with (tree, accepted node path) after every verification of every sequence
        self.listeners: list[Callable[[Tree, list[int]], None]] = []
        self._joining: dict[int, SequenceDecoder] = {}  # added, prefilled at the next step
        self._decoding: dict[int, SequenceDecoder] = {}
        self._planned_for: dict[int, int] = {}  # seq_id -> the batch size its planner's costs are for
        self._next_id = 0
        self._lock = threading.RLock()

    @classmethod
    def from_generator(cls, generator, max_batch: int = 1) -> BatchGenerator:
        """A batch over ``generator``'s target and drafter that plans as it does: from this machine's calibration
        (a calibrated generator), a copy of its planner per sequence (a given one), or not at all."""
        planner = "auto" if generator.calibration is not None else generator.planner
        return cls(generator.target, generator.drafter, planner=planner, matmul_path=generator.matmul_path,
                   max_batch=max_batch)

    @property
    def active(self) -> int:
        """Sequences added and neither finished nor cancelled."""
        return len(self._joining) + len(self._decoding)

    # ---------------------------------------------------------------- joining and leaving
    def add(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        input_ids: typing.Sequence[int] | None = None,
        max_new_tokens: int = 128,
        stop: typing.Sequence[str] | str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> int:
        """Queue a sequence (the arguments of :meth:`~.generate.SpeculativeGenerator.stream`) and return its id; it
        is prefilled at the next :meth:`step`. An invalid request raises :class:`~.request.RequestError` and a full
        batch :class:`BatchFullError`, both before anything changes."""
        with self._lock:
            request, prompt_ids = check_stream_request(
                self.target, prompt, messages=messages, input_ids=input_ids, max_new_tokens=max_new_tokens,
                stop=stop, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, ignore_eos=ignore_eos)
            if self.active >= self.max_batch:
                raise BatchFullError(f"the batch is full: {self.max_batch} sequences are active")
            size = self.active + 1
            decoder = SequenceDecoder(self.target, self.drafter, self._new_planner(size), prompt_ids,
                                      request.max_new_tokens, request.params, request.stop, request.ignore_eos,
                                      self.listeners)
            seq_id, self._next_id = self._next_id, self._next_id + 1
            self._joining[seq_id] = decoder
            self._planned_for[seq_id] = size
            return seq_id

    def cancel(self, seq_id: int) -> None:
        """Drop a sequence at once (its slot is free for the next :meth:`add`); unknown or finished ids: no-op."""
        with self._lock:
            self._leave(seq_id)

    def _leave(self, seq_id: int) -> None:
        self._joining.pop(seq_id, None)
        self._decoding.pop(seq_id, None)
        self._planned_for.pop(seq_id, None)

    # ---------------------------------------------------------------- one cycle
    def step(self) -> dict[int, StreamChunk]:
        """One cycle for every active sequence: prefill the newcomers, propose every tree, verify them all in one
        target forward, accept. Returns the chunks of the sequences that have text to send or finished (a chunk
        with ``finish_reason`` is that sequence's last: it has left the batch)."""
        with self._lock:
            self._replan(self.active)
            for seq_id, decoder in list(self._joining.items()):
                decoder.prefill()
                self._decoding[seq_id] = self._joining.pop(seq_id)
            if not self._decoding:
                return {}
            ids = list(self._decoding)
            decoders = [self._decoding[i] for i in ids]
            self._plan_together(decoders)
            trees = [decoder.propose() for decoder in decoders]
            start = time.perf_counter()
            outs = self.target.forward_trees(trees, [d.cache for d in decoders], self.drafter.feature_layers)
            elapsed = elapsed_since(self.target, start)
            chunks = {}
            for seq_id, decoder, tree, out in zip(ids, decoders, trees, outs):
                decoder.stats.verify_time += elapsed  # every sequence waits for the whole forward
                chunk = decoder.accept(tree, out)
                if chunk is not None:
                    chunks[seq_id] = chunk
                    if chunk.finish_reason is not None:
                        self._leave(seq_id)
            return chunks

    def generate(self, requests: list[dict]) -> list[GenerationResult]:
        """Decode ``requests`` (dicts of :meth:`add`'s arguments) together, at most ``max_batch`` at a time, and
        return their results in order. Every request is checked before any runs; the batch must be idle."""
        with self._lock:
            if self.active:
                raise RuntimeError(f"generate needs an idle batch; {self.active} sequences are active")
            for request in requests:
                check_stream_request(self.target, **request)
            waiting = list(enumerate(requests))
            chunks: list[list[StreamChunk]] = [[] for _ in requests]
            index: dict[int, int] = {}
            try:
                while waiting or self.active:
                    while waiting and self.active < self.max_batch:
                        i, request = waiting.pop(0)
                        index[self.add(**request)] = i
                    for seq_id, chunk in self.step().items():
                        chunks[index[seq_id]].append(chunk)
            finally:
                for seq_id in index:
                    self._leave(seq_id)
            return [collect(c) for c in chunks]

    # ---------------------------------------------------------------- budgets
    @property
    def _plans_from_calibration(self) -> bool:
        return self.calibration is not None and self.drafter.planned

    def _new_planner(self, batch_size: int) -> BudgetPlanner | None:
        if self._plans_from_calibration:
            return self.calibration.planner(self.target, self.drafter, self.matmul_path, batch_size)
        return copy.deepcopy(self._template) if self._template is not None else None

    def _plan_together(self, decoders: list[SequenceDecoder]) -> None:
        """Give every drafting sequence the batch's one budget (:func:`~.planner.batch_plan`): the forward pads every
        tree to the largest, so a tree one sequence alone would choose costs every sequence its rows."""
        planned = [d for d in decoders if d.planner is not None]
        if len(planned) < 2:
            return  # one sequence (or fixed budgets): its own plan
        plan = batch_plan([d.planner for d in planned], [d.follow for d in planned])
        plain = Plan(1, 0, 1.0, plan.cycle_seconds)
        for decoder in planned:
            if decoder.follow:
                # as alone, a drafter that cannot be probed stops following when it is not to draft: no drafter pass
                # per cycle for trees the batch will not verify
                decoder.follow = not plan.plain or decoder.planner.probe
            decoder.plan = plan if decoder.follow else plain  # one that does not follow never drafts again

    def _replan(self, batch_size: int) -> None:
        """Give every sequence's planner its share of a forward over ``batch_size`` sequences."""
        if not self._plans_from_calibration:
            return
        for seq_id, decoder in {**self._joining, **self._decoding}.items():
            # a sequence whose drafter stopped following the text decodes plainly to its end (see SequenceDecoder)
            following = seq_id in self._joining or decoder.follow
            if self._planned_for[seq_id] != batch_size and following:
                decoder.plan = decoder.planner.set_verify_cost(
                    self.calibration.verify_cost(self.matmul_path, batch_size)) or decoder.plan
                self._planned_for[seq_id] = batch_size

"""The decode loop: draft a tree, verify it in one target forward, keep the accepted path, repeat.

``SpeculativeGenerator.stream`` is the loop for one sequence; ``generate`` collects it. What happens to one sequence
in a cycle (propose a tree, accept the verified path, turn tokens into text) is a :class:`SequenceDecoder`, which the
batched loop (:mod:`.batch`) drives too, several sequences per target forward. With no drafter (or ``NoDrafter``)
every cycle is one plain autoregressive step through the same engine, on the product path measured fastest here:
the baseline speed-ups are measured against.
A planned drafter (the default) gets its tree budget from a :class:`~.planner.BudgetPlanner` built from this
machine's calibration; when the planner expects no tree to beat plain decoding, the loop decodes plainly.

What one generation changes (KV cache, committed ids, sampling seed, drafter state) lives in its own
:class:`~.sequence.Sequence`: any number of generators may share one target and one drafter.
"""

from __future__ import annotations

import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .calibrate import for_generation
from .detokenize import IncrementalDetokenizer
from .drafters.base import Drafter, NoDrafter
from .metrics import SpecStats
from .planner import BudgetPlanner
from .request import GenerationRequest, check_budget, check_input_ids, check_request
from .sampling import SamplingParams
from .sequence import Sequence
from .target import TargetModel, TreeOutput
from .tree import Tree
from .verify import greedy_verify, sample_verify


@dataclass
class StreamChunk:
    text: str  # new text since the previous chunk (may be empty while a possible stop string is held back)
    token_ids: list[int]  # new token ids since the previous chunk
    token_depths: list[int] = field(default_factory=list)  # per token: draft depth that proposed it, 0 = target's own
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length", on the last chunk only
    stats: SpecStats | None = None  # on the last chunk only


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats = field(repr=False)
    token_depths: list[int] = field(default_factory=list, repr=False)  # per token: draft depth, 0 = target's own


class SpeculativeGenerator:
    """Lossless speculative generation for one target and one drafter, one sequence at a time per generator (its
    planner follows one sequence); generators may share the target and the drafter. For several sequences in one
    target forward per cycle, see :class:`~.batch.BatchGenerator`."""

    def __init__(self, target: TargetModel, drafter: Drafter | None = None,
                 planner: BudgetPlanner | str | None = "auto", matmul_path: str | None = None):
        """``planner``: for a planned drafter (one built without an explicit budget), ``"auto"`` plans from this
        machine's calibration (:mod:`.calibrate`: measured once, quick form, then cached); a
        :class:`~.planner.BudgetPlanner` is used as given; None leaves the drafter's budget as it is.
        With ``"auto"``, for any drafter (planned or with a fixed budget) and for plain decoding, the target's
        few-row forwards, one-row steps included, take the product paths that calibration measured faster here
        (None measures nothing and leaves the paths as they are). ``matmul_path``: force the product path of
        few-row forwards (``stock``, ``few-row`` or ``onednn``; default: the measured fastest per row count)."""
        self.target = target
        self.drafter = drafter or NoDrafter()
        self.planner: BudgetPlanner | None = None
        self.matmul_path = matmul_path
        self.calibration = for_generation(target, self.drafter, planner, matmul_path)  # and the product paths
        if self.drafter.planned and not isinstance(self.drafter, NoDrafter) and planner is not None:
            if self.calibration is not None:
                planner = self.calibration.planner(target, self.drafter, matmul_path)
            if not isinstance(planner, BudgetPlanner):
                raise ValueError(f"planner must be 'auto', a BudgetPlanner or None, got {planner!r}")
            self.planner = planner
        # called with (tree, accepted node path) after every verification (calibration counts acceptances this way)
        self.listeners: list[Callable[[Tree, list[int]], None]] = []
        self._busy = threading.Lock()

    # ---------------------------------------------------------------- public API
    def generate(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        return collect(self.stream(prompt, **kwargs))

    def stream(
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
    ) -> Iterator[StreamChunk]:
        """Yield text as it is generated; the last chunk carries ``finish_reason`` and ``stats``.

        Give exactly one of ``prompt`` (plain text), ``messages`` (chat, formatted by the tokenizer's template)
        or ``input_ids``. Invalid arguments raise ``ValueError`` (a :class:`~.request.RequestError`, see
        :mod:`.request`) before any work is done.
        """
        request, prompt_ids = check_stream_request(
            self.target, prompt, messages=messages, input_ids=input_ids, max_new_tokens=max_new_tokens, stop=stop,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, ignore_eos=ignore_eos)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this generator is already generating: use one generator per concurrent request")
        try:
            yield from self._stream_text(prompt_ids, max_new_tokens, request.params, request.stop, ignore_eos)
        finally:
            self._busy.release()

    # ---------------------------------------------------------------- the decode loop
    def _stream_text(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                     stops: list[str], ignore_eos: bool) -> Iterator[StreamChunk]:
        """Draft a tree, verify it in one target forward, accept, send the new text; until the last chunk."""
        decoder = SequenceDecoder(self.target, self.drafter, self.planner, prompt_ids, max_new_tokens, params,
                                  stops, ignore_eos, self.listeners)
        decoder.prefill()
        while True:
            tree = decoder.propose()
            chunk = decoder.accept(tree, decoder.forward(tree))
            if chunk is not None:
                yield chunk
                if chunk.finish_reason is not None:
                    return


def collect(chunks: typing.Iterable[StreamChunk]) -> GenerationResult:
    """One generation's chunks, the last one included, as one result."""
    text, ids, depths, last = [], [], [], None
    for chunk in chunks:
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        depths.extend(chunk.token_depths)
        last = chunk
    return GenerationResult("".join(text), ids, last.finish_reason, last.stats, depths)


def check_stream_request(target: TargetModel, prompt: str | None = None,
                         **kwargs) -> tuple[GenerationRequest, list[int]]:
    """Check the arguments of :meth:`SpeculativeGenerator.stream` (the same keywords) against ``target``: the request
    and its prompt token ids, or a :class:`~.request.RequestError` before any work is done."""
    request = check_request(prompt, **kwargs)
    if request.input_ids is not None:
        prompt_ids = check_input_ids(request.input_ids, target.vocab_size)
    else:
        prompt_ids = check_input_ids(target.encode(request.prompt, request.messages), param="prompt")
    check_budget(len(prompt_ids), request.max_new_tokens, target.max_context)
    return request, prompt_ids


# ---------------------------------------------------------------------------------------------- one sequence
class SequenceDecoder:
    """One sequence's decode, cycle by cycle: the logic the solo loop and the batch (:mod:`.batch`) share.

    :meth:`prefill` once; then every cycle :meth:`propose` a tree, run the target over it (:meth:`forward` alone,
    or :meth:`~.target.TargetModel.forward_trees` with other sequences), and :meth:`accept` its output: the chunk to
    send (None while nothing is ready; ``finish_reason`` set on the last one, which carries the stats).
    """

    def __init__(self, target: TargetModel, drafter: Drafter, planner: BudgetPlanner | None, prompt_ids: list[int],
                 max_new_tokens: int, params: SamplingParams, stops: list[str], ignore_eos: bool,
                 listeners: typing.Sequence[Callable[[Tree, list[int]], None]] = ()):
        self.target, self.planner, self.params, self.listeners = target, planner, params, listeners
        self.max_new_tokens = max_new_tokens
        self.stats = SpecStats(prompt_tokens=len(prompt_ids))
        self.started = time.perf_counter()
        self.seq = Sequence.start(target, drafter, prompt_ids, params)
        self.drafter = self.seq.drafter
        self.text = TextStream(target.tokenizer, set() if ignore_eos else target.eos_token_ids, stops,
                               max_new_tokens)
        self.plan = planner.start() if planner is not None else None
        self.follow = False  # whether the drafter follows the text (see prefill)
        self.produced = 0  # tokens committed (EOS and tokens past it included)

    @property
    def cache(self):
        return self.seq.cache

    def prefill(self) -> None:
        """Cache everything but the last token, which becomes the first tree's root."""
        start = time.perf_counter()
        hidden = self.target.prefill(self.seq.ids[:-1], self.drafter.feature_layers, cache=self.seq.cache)
        # the drafter follows the text while it drafts; one that is cheap to follow also while decoding plainly
        self.follow = self.planner is None or not self.plan.plain or self.planner.probe
        if self.follow:
            self.drafter.begin(self.seq.ids, hidden)
        self.stats.prefill_time = elapsed_since(self.target, start)

    def propose(self) -> Tree:
        """Draft a tree within the plan's budget (see :meth:`~.planner.BudgetPlanner.cycle_budget`); none when plain
        decoding is expected to be faster, but for an occasional probe; nodes deeper than the remaining budget could
        never be used."""
        start = time.perf_counter()
        planner, plan, seq = self.planner, self.plan, self.seq
        max_depth = min(self.max_new_tokens - self.produced, self.target.max_context - seq.cache.length) - 1
        if plan is not None:
            self.stats.note_plan(plan)
        budget = planner.cycle_budget(plan) if planner is not None else None
        if planner is None or budget is not None:
            if budget is not None:
                self.drafter.set_budget(budget.num_nodes, budget.depth)
            tree = self.drafter.propose(seq.ids, max_depth).truncate(max_depth)
        else:
            tree = Tree.root_only(seq.root)
        self.stats.draft_time += elapsed_since(self.target, start)
        return tree

    def forward(self, tree: Tree) -> TreeOutput:
        """The target forward over ``tree`` for this sequence alone."""
        start = time.perf_counter()
        out = self.target.forward_tree(tree, self.drafter.feature_layers, cache=self.seq.cache)
        self.stats.verify_time += elapsed_since(self.target, start)
        return out

    def accept(self, tree: Tree, out: TreeOutput) -> StreamChunk | None:
        """Verify ``tree`` against the target's output ``out`` (its cache already holds the tree's nodes), keep the
        accepted path, and return what there is to send."""
        tokens, depths = self._accept(tree, out)
        chunk = self.text.add(tokens, depths)
        if chunk is not None and chunk.finish_reason is not None:
            self.stats.new_tokens = len(self.text.new_ids)
            self.stats.total_time = time.perf_counter() - self.started
            chunk.stats = self.stats
        return chunk

    def _accept(self, tree: Tree, out: TreeOutput) -> tuple[list[int], list[int]]:
        """The tokens this cycle commits (accepted drafts + bonus) and the draft depth of each (bonus: 0)."""
        target, planner, seq, drafter, stats = self.target, self.planner, self.seq, self.drafter, self.stats
        # accept the longest agreeing path and a bonus token, and keep only the accepted nodes in the cache
        start = time.perf_counter()
        if self.params.greedy:
            acceptance = greedy_verify(tree, out.logits)
        else:
            acceptance = sample_verify(tree, self.params.target_probs(out.logits), seq.uniforms(max(tree.depth) + 1))
        target.compact(acceptance.path, tree.num_nodes, cache=seq.cache)
        stats.verify_time += elapsed_since(target, start)
        stats.observe(drafted=tree.num_nodes - 1, accepted=acceptance.num_accepted)

        # commit, let the drafter see the result, and re-plan from it
        start = time.perf_counter()
        seq.commit(acceptance.tokens)
        if self.follow:
            drafter.observe_forward(tree, out.logits)
            drafter.observe(acceptance, out.features[acceptance.path])
        if planner is not None:
            self.plan = planner.observe(tree, acceptance.path)
            self.follow = self.follow and (not self.plan.plain or planner.probe)  # else plain from now on
        for listener in self.listeners:
            listener(tree, acceptance.path)
        stats.draft_time += elapsed_since(target, start)
        self.produced += len(acceptance.tokens)
        return acceptance.tokens, list(range(1, acceptance.num_accepted + 1)) + [0]


# ---------------------------------------------------------------------------------------------- text
class TextStream:
    """One sequence's committed tokens turned into :class:`StreamChunk` s: EOS, ``max_new_tokens``, stop strings and
    incremental detokenization (an incomplete character, or text that may be the start of a stop string, waits)."""

    def __init__(self, tokenizer, eos: set[int], stops: list[str], max_new_tokens: int):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.eos, self.stops, self.max_new_tokens = eos, stops, max_new_tokens
        self.holdback = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        self.new_ids: list[int] = []
        self.depths: list[int] = []
        self.sent_ids = self.sent_chars = 0

    def add(self, tokens: list[int], token_depths: list[int]) -> StreamChunk | None:
        """One cycle's tokens -> the chunk to send: None while nothing is ready, ``finish_reason`` set on the last
        (its ``stats`` are the caller's to fill)."""
        new_ids, depths, finish_reason = self.new_ids, self.depths, None
        fresh = len(new_ids)
        for tok, depth in zip(tokens, token_depths):
            if tok in self.eos:
                finish_reason = "stop"
                break
            new_ids.append(tok)
            depths.append(depth)
        del new_ids[self.max_new_tokens:], depths[self.max_new_tokens:]
        full = len(new_ids) >= self.max_new_tokens
        self.detokenizer.add(new_ids[fresh:], final=finish_reason == "stop" or full)
        text = self.detokenizer.text  # an incomplete multi-byte character at the end waits for the rest
        start = max(0, self.sent_chars - self.holdback)
        stop_at = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if stop_at >= 0:
            text, finish_reason = text[:stop_at], "stop"
        if finish_reason is not None or full:
            return StreamChunk(text[self.sent_chars:], new_ids[self.sent_ids:], depths[self.sent_ids:],
                               finish_reason or "length")
        ready = len(text) - self.holdback
        if ready <= self.sent_chars:
            return None
        chunk = StreamChunk(text[self.sent_chars:ready], new_ids[self.sent_ids:], depths[self.sent_ids:])
        self.sent_chars, self.sent_ids = ready, len(new_ids)
        return chunk


def elapsed_since(target: TargetModel, start: float) -> float:
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    return time.perf_counter() - start

"""The decode loop: draft a tree, verify it in one target forward, keep the accepted path, repeat.

``SpeculativeGenerator.stream`` is the one loop; ``generate`` collects it. With no drafter (or ``NoDrafter``)
every cycle is one plain autoregressive step through the same engine: the baseline speed-ups are measured against.
A planned drafter (the default) gets its tree budget from a :class:`~.planner.BudgetPlanner` built from this
machine's calibration; when the planner expects no tree to beat plain decoding, the loop decodes plainly.

What one generation changes (KV cache, committed ids, sampling generator, drafter state) lives in its own
:class:`~.sequence.Sequence`: any number of generators may share one target and one drafter.
"""

from __future__ import annotations

import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .detokenize import IncrementalDetokenizer
from .drafters.base import Drafter, NoDrafter
from .metrics import SpecStats
from .planner import BudgetPlanner
from .request import GenerationRequest, check_budget, check_input_ids, check_request
from .sampling import SamplingParams
from .sequence import Sequence
from .target import TargetModel
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
    planner follows one sequence); generators may share the target and the drafter."""

    def __init__(self, target: TargetModel, drafter: Drafter | None = None,
                 planner: BudgetPlanner | str | None = "auto", matmul_path: str | None = None):
        """``planner``: for a planned drafter (one built without an explicit budget), ``"auto"`` plans from this
        machine's calibration (:mod:`.calibrate`: measured once, quick form, then cached); a
        :class:`~.planner.BudgetPlanner` is used as given; None leaves the drafter's budget as it is.
        ``matmul_path``: force the product path of few-row forwards (``stock`` or ``few-row``; default: the
        measured faster one per row count)."""
        self.target = target
        self.drafter = drafter or NoDrafter()
        self.calibration = None
        self.planner: BudgetPlanner | None = None
        if self.drafter.planned and not isinstance(self.drafter, NoDrafter) and planner is not None:
            if planner == "auto":
                from .calibrate import Calibration

                self.calibration = Calibration.for_target(target)
                planner = self.calibration.planner(target, self.drafter, matmul_path)
            if not isinstance(planner, BudgetPlanner):
                raise ValueError(f"planner must be 'auto', a BudgetPlanner or None, got {planner!r}")
            self.planner = planner
        # called with (tree, accepted node path) after every verification (calibration counts acceptances this way)
        self.listeners: list[Callable[[Tree, list[int]], None]] = []
        self._busy = threading.Lock()

    # ---------------------------------------------------------------- public API
    def generate(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        text, ids, depths, last = [], [], [], None
        for chunk in self.stream(prompt, **kwargs):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            depths.extend(chunk.token_depths)
            last = chunk
        return GenerationResult("".join(text), ids, last.finish_reason, last.stats, depths)

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
        request = check_request(prompt, messages, input_ids, max_new_tokens=max_new_tokens, stop=stop,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, ignore_eos=ignore_eos)
        prompt_ids = self._prompt_ids(request)
        check_budget(len(prompt_ids), max_new_tokens, self.target.max_context)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this generator is already generating: use one generator per concurrent request")
        try:
            yield from self._stream_text(prompt_ids, max_new_tokens, request.params, request.stop, ignore_eos)
        finally:
            self._busy.release()

    # ---------------------------------------------------------------- the decode loop
    def _cycles(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                stats: SpecStats) -> Iterator[tuple[list[int], list[int]]]:
        """Yield the tokens each cycle commits (accepted drafts + bonus) and the draft depth of each (bonus: 0)."""
        target, planner = self.target, self.planner
        seq = Sequence.start(target, self.drafter, prompt_ids, params)
        drafter = seq.drafter
        plan = planner.start() if planner is not None else None

        # 0. prefill everything but the last token, which becomes the first tree's root
        start = time.perf_counter()
        hidden = target.prefill(seq.ids[:-1], drafter.feature_layers, cache=seq.cache)
        # the drafter follows the text while it drafts; one that is cheap to follow also while decoding plainly
        follow = planner is None or not plan.plain or planner.probe
        if follow:
            drafter.begin(seq.ids, hidden)
        stats.prefill_time = self._elapsed(start)
        produced = 0
        while produced < max_new_tokens:
            # 1. draft a tree within the plan's budget; none when plain decoding is expected to be faster, but for
            #    an occasional probe; nodes deeper than the remaining budget could never be used
            start = time.perf_counter()
            max_depth = min(max_new_tokens - produced, target.max_context - seq.cache.length) - 1
            budget = planner.probe_plan() if plan is not None and plan.plain else plan
            if planner is None or budget is not None:
                if budget is not None:
                    drafter.set_budget(budget.num_nodes, budget.depth)
                tree = drafter.propose(seq.ids, max_depth).truncate(max_depth)
            else:
                tree = Tree.root_only(seq.root)
            stats.draft_time += self._elapsed(start)

            # 2. one target forward over the whole tree
            start = time.perf_counter()
            out = target.forward_tree(tree, drafter.feature_layers, cache=seq.cache)

            # 3. accept the longest agreeing path and a bonus token
            if params.greedy:
                acceptance = greedy_verify(tree, out.logits)
            else:
                acceptance = sample_verify(tree, params.target_probs(out.logits), seq.generator)

            # 4. keep only the accepted nodes in the cache
            target.compact(acceptance.path, tree.num_nodes, cache=seq.cache)
            stats.verify_time += self._elapsed(start)
            stats.observe(drafted=tree.num_nodes - 1, accepted=acceptance.num_accepted)

            # 5. commit, let the drafter see the result, and re-plan from it
            start = time.perf_counter()
            seq.commit(acceptance.tokens)
            if follow:
                drafter.observe_forward(tree, out.logits)
                drafter.observe(acceptance, out.features[acceptance.path])
            if planner is not None:
                plan = planner.observe(tree, acceptance.path)
                follow = follow and (not plan.plain or planner.probe)  # else plain for the rest of the generation
            for listener in self.listeners:
                listener(tree, acceptance.path)
            stats.draft_time += self._elapsed(start)
            produced += len(acceptance.tokens)
            yield acceptance.tokens, list(range(1, acceptance.num_accepted + 1)) + [0]

    # ---------------------------------------------------------------- text, EOS and stop strings
    def _stream_text(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                     stops: list[str], ignore_eos: bool) -> Iterator[StreamChunk]:
        detokenizer = IncrementalDetokenizer(self.target.tokenizer)
        eos = set() if ignore_eos else self.target.eos_token_ids
        holdback = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        stats = SpecStats(prompt_tokens=len(prompt_ids))
        started = time.perf_counter()
        new_ids: list[int] = []
        depths: list[int] = []
        sent_ids = sent_chars = 0
        finish_reason = "length"
        for tokens, token_depths in self._cycles(prompt_ids, max_new_tokens, params, stats):
            fresh = len(new_ids)
            for tok, depth in zip(tokens, token_depths):
                if tok in eos:
                    finish_reason = "stop"
                    break
                new_ids.append(tok)
                depths.append(depth)
            new_ids, depths = new_ids[:max_new_tokens], depths[:max_new_tokens]
            detokenizer.add(new_ids[fresh:], final=finish_reason == "stop" or len(new_ids) >= max_new_tokens)
            text = detokenizer.text  # an incomplete multi-byte character at the end waits for the rest
            stop_at = min((i for i in (text.find(s, max(0, sent_chars - holdback)) for s in stops) if i >= 0),
                          default=-1)
            if stop_at >= 0:
                text, finish_reason = text[:stop_at], "stop"
            if finish_reason == "stop" or len(new_ids) >= max_new_tokens:
                break
            ready = len(text) - holdback
            if ready > sent_chars:
                yield StreamChunk(text[sent_chars:ready], new_ids[sent_ids:], depths[sent_ids:])
                sent_chars, sent_ids = ready, len(new_ids)
        stats.new_tokens = len(new_ids)
        stats.total_time = time.perf_counter() - started
        if self.planner is not None:
            stats.record_plans(self.planner)
        yield StreamChunk(text[sent_chars:], new_ids[sent_ids:], depths[sent_ids:], finish_reason, stats)

    # ---------------------------------------------------------------- checks
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.input_ids is not None:
            return check_input_ids(request.input_ids, self.target.vocab_size)
        return check_input_ids(self.target.encode(request.prompt, request.messages), param="prompt")

    def _elapsed(self, start: float) -> float:
        if self.target.device.type == "cuda":
            torch.cuda.synchronize(self.target.device)
        return time.perf_counter() - start

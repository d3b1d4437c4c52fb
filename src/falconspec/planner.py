"""The budget planner: how big a tree to verify, and how deep to draft, to maximise tokens per second.

Each cycle commits ``1 + accepted`` tokens and costs ``c(n) + d(D)``: one target forward over ``n`` tree nodes
(the measured cost curve, :mod:`.calibrate`) plus drafting ``D`` levels deep (the drafter's measured cost). The
planner picks the plan (n, D) with the highest ``(1 + E[accepted | n, D]) / (c(n) + d(D))``, and plain decoding
(n = 1: one forward, no drafting) when no tree is expected to beat it.

E[accepted] comes from Sequoia's positional acceptance model (Chen et al., 2024): ``p[d][r]`` is the probability
that the rank-r child at depth d matches the target's token given that its parent was accepted (rank = order among
siblings, as the drafter proposes them; depth matters because a k=2 SAR drafter's two block slots and every
further drafter pass differ). A node is accepted with the product of ``p`` along its path, so the expected number
of accepted drafts of a tree is the sum of its nodes' path probabilities, and the best tree of n nodes under the
model is the n - 1 most probable nodes (grown best-first, a node's next sibling and first child becoming
candidates when it is taken).

``p`` starts from a prior (the drafter's calibration run), plus what earlier generations of the same planner saw
(capped at ``CARRY_TRIALS`` per cell: the workload's acceptance), and is updated after every verification with the
acceptances of the current generation (a Beta posterior per cell). The prior only stands in for the workload: a
cell's prior weight shrinks as carried evidence fills it and is gone at ``CARRY_TRIALS`` trials (a calibration of
a few dozen tokens on built-in prompts can be far off the workload, and a prior that never fades keeps its error
for good). So the plan follows the text: it grows while the drafter is right and shrinks, down to plain decoding,
when it is not. Once plain, a drafter that needs a model pass to follow the text is left alone for the rest of the
generation (following it would cost that pass every step), so that fallback waits for ``MIN_FALLBACK_TRIALS`` of
this generation's own evidence; one that is free to follow (n-gram lookup, lookahead, Medusa) is probed with the
best tree every ``PROBE_EVERY`` cycles, and switched back on when the probes say it pays.

A generation that starts plain drafts nothing, so it learns nothing: left alone, carried evidence that once said
"plain" (one unlucky generation can) would say it for good. So the planner **retries** with exponential backoff:
after 1, then 2, 4, 8 ... generations in a row that start plain, a generation starts from the calibration prior
alone (the carried evidence is forgotten). A retry that falls back doubles the wait; a generation that drafts to
its end resets it. A drafter the calibration itself rules out is never retried. Verification stays exact whatever the
plan: the planner only decides how much to verify.

A plan of depth D never drafts level D + 1, so its estimate there would stay whatever the prior said (a calibration
of a few prompts can be far off the workload's). So the planner **explores**: every ``EXPLORE_EVERY`` tree cycles,
while the level below the plan has less than ``CARRY_TRIALS`` trials of evidence, the cycle drafts the same number
of nodes one level deeper (the drafter places a node there when its score beats the plan's last sibling). The cost
is one drafting level now and then; the verified tree keeps its size.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .tree import Tree

MAX_DEPTH = 12  # depths the acceptance model tracks (deeper nodes share the last row)
MAX_RANK = 8  # sibling ranks it tracks (the planner never counts on later siblings)
PRIOR_STRENGTH = 16.0  # the prior weighs as much as this many observed trials per cell (until carried evidence)
DECAY_WITHOUT_DATA = 0.5  # a rank calibration saw too little of: this share of the probability its elders leave
UNINFORMED = 0.5  # depth 1, rank 0 with no calibration at all
CARRY_TRIALS = 32.0  # evidence carried from earlier generations weighs at most this many trials per cell
MIN_FALLBACK_TRIALS = 8  # a drafter that cannot be probed falls back mid-generation only on this much evidence
PROBE_EVERY = 8  # while decoding plainly, a drafter that is cheap to follow is tried once every this many cycles
RETRY_BACKOFF = 2  # a retry that falls back again multiplies the wait before the next one by this
EXPLORE_EVERY = 8  # a tree plan drafts one level deeper once every this many cycles while that level is little known


@dataclass(frozen=True)
class Plan:
    num_nodes: int  # tree nodes verified per cycle, root included; 1 = plain decoding
    depth: int  # deepest drafted level; 0 for plain decoding
    expected_tokens: float  # committed tokens per cycle, bonus included
    cycle_seconds: float  # expected seconds per cycle

    @property
    def plain(self) -> bool:
        return self.num_nodes == 1

    @property
    def tokens_per_second(self) -> float:
        return self.expected_tokens / self.cycle_seconds

    def describe(self) -> str:
        shape = "plain decoding" if self.plain else f"{self.num_nodes} nodes, depth {self.depth}"
        return f"{shape}: E[tokens/forward] {self.expected_tokens:.2f}, {self.tokens_per_second:.1f} tok/s expected"


class AcceptanceProfile:
    """Per (depth, sibling rank) Beta posterior of the probability that a node matches, given its parent did."""

    def __init__(self, prior: np.ndarray | None = None, strength: float = PRIOR_STRENGTH):
        """``prior``: [depth, rank] probabilities from calibration, any shape up to MAX_DEPTH x MAX_RANK; NaN (or
        missing) where calibration saw too little. Such cells borrow, at every re-plan, the current estimate of the
        depth above (rank 0) or a share of the rank before: a drafter whose first level turns out right is expected
        to stay right deeper down until the deeper levels are tried, and are then judged on their own."""
        self.prior = np.full((MAX_DEPTH, MAX_RANK), np.nan)
        if prior is not None:
            prior = np.asarray(prior, dtype=float)
            d, r = min(prior.shape[0], MAX_DEPTH), min(prior.shape[1], MAX_RANK)
            self.prior[:d, :r] = np.clip(prior[:d, :r], 0.0, 1.0)
        self.strength = strength
        self.hits = np.zeros((MAX_DEPTH, MAX_RANK))  # this generation
        self.trials = np.zeros((MAX_DEPTH, MAX_RANK))
        self.carried_hits = np.zeros((MAX_DEPTH, MAX_RANK))  # earlier generations, at most CARRY_TRIALS per cell
        self.carried_trials = np.zeros((MAX_DEPTH, MAX_RANK))

    def reset(self) -> None:
        """Start a generation: what the last one saw joins the carried evidence (the workload's acceptance), capped
        so that the new generation's own acceptances still move the estimate within a few cycles."""
        self.carried_hits += self.hits
        self.carried_trials += self.trials
        scale = np.minimum(1.0, CARRY_TRIALS / np.maximum(self.carried_trials, 1e-9))
        self.carried_hits *= scale
        self.carried_trials *= scale
        self.hits[:] = 0
        self.trials[:] = 0

    def forget_carried(self) -> None:
        """Drop the evidence of earlier generations: estimates come from the prior and this generation alone."""
        self.carried_hits[:] = 0
        self.carried_trials[:] = 0

    def observe(self, tree: Tree, accepted_path: Sequence[int]) -> None:
        """Record one verification: every node whose parent was accepted is a trial at its (depth, rank)."""
        hits, trials = tree_trials(tree, accepted_path)
        self.hits += hits
        self.trials += trials

    def probabilities(self) -> np.ndarray:
        """[MAX_DEPTH, MAX_RANK] posterior means, made non-increasing across ranks (a drafter's later candidates are
        its less likely ones; noise must not make rank 3 look better than rank 2) and summing to at most 1 per
        depth (at most one sibling can match the target's token)."""
        hits = (self.hits + self.carried_hits).tolist()
        trials = (self.trials + self.carried_trials).tolist()
        # the prior's weight per cell: it gives way to the carried evidence, gone once that holds CARRY_TRIALS trials
        weight = (self.strength * np.clip(1.0 - self.carried_trials / CARRY_TRIALS, 0.0, 1.0)).tolist()
        known = self.prior.tolist()
        p = [[0.0] * MAX_RANK for _ in range(MAX_DEPTH)]
        for d in range(MAX_DEPTH):
            for r in range(MAX_RANK):
                prior = known[d][r]
                if prior != prior:  # NaN: rank 0 borrows the estimate above; a later rank a share of what is left
                    prior = ((p[d - 1][0] if d else UNINFORMED) if r == 0
                             else DECAY_WITHOUT_DATA * min(p[d][r - 1], max(0.0, 1.0 - sum(p[d][:r]))))
                elif r and known[d][0] > 0:  # later ranks are rarely verified: they move with the top candidate
                    prior *= p[d][0] / known[d][0]
                w = weight[d][r]
                p[d][r] = min(max((hits[d][r] + w * prior) / max(trials[d][r] + w, 1e-9), 0.0),
                              p[d][r - 1] if r else 1.0)
        out = np.asarray(p)
        return out / np.maximum(out.sum(axis=1, keepdims=True), 1.0)


def tree_trials(tree: Tree, accepted_path: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """[MAX_DEPTH, MAX_RANK] hit and trial counts of one verified tree (see :class:`AcceptanceProfile`)."""
    hits, trials = np.zeros((MAX_DEPTH, MAX_RANK)), np.zeros((MAX_DEPTH, MAX_RANK))
    accepted = set(accepted_path)
    for parent in accepted:
        for rank, child in enumerate(tree.children[parent].values()):  # children in node order = drafter's order
            cell = (min(tree.depth[child], MAX_DEPTH) - 1, min(rank, MAX_RANK - 1))
            trials[cell] += 1
            hits[cell] += child in accepted
    return hits, trials


def best_tree_gains(p: np.ndarray, max_nodes: int, max_depth: int) -> np.ndarray:
    """Cumulative path probabilities of the best-first tree under the positional model ``p`` [depth, rank]."""
    gains = np.zeros(max_nodes + 1)
    if max_depth < 1 or max_nodes < 2:
        return gains
    cols = p.shape[1]
    # plain floats (this runs every cycle), one row per depth up to max_depth (deeper depths share the last row)
    table = [row + [0.0] for row in p.tolist()]
    table += [table[-1]] * (max_depth + 1 - len(table))
    heap = [(-table[0][0], 1, 0, 1.0)]  # (-path probability, depth, rank, parent's path probability)
    total = 0.0
    for n in range(2, max_nodes + 1):
        if not heap:
            gains[n:] = total
            break
        neg, depth, rank, parent = heapq.heappop(heap)
        total -= neg
        gains[n] = total
        sibling = parent * table[depth - 1][rank + 1] if rank + 1 < cols else 0.0
        if sibling > 0:
            heapq.heappush(heap, (-sibling, depth, rank + 1, parent))
        if depth < max_depth and table[depth][0] > 0:
            heapq.heappush(heap, (neg * table[depth][0], depth + 1, 0, -neg))
    return gains


@dataclass
class PlanChange:
    cycle: int
    plan: Plan


@dataclass
class BudgetPlanner:
    """Chooses a :class:`Plan` from the cost of verification, the cost of drafting and the acceptance profile.

    ``verify_cost(n)``: seconds of one target forward over n nodes (n = 1: a plain step); ``draft_cost(d)``:
    seconds of drafting d levels deep, the drafter's update included; ``sizes``: tree sizes to consider (the
    calibrated ones); ``max_depth``: the deepest the drafter can draft.
    """

    verify_cost: Callable[[int], float]
    draft_cost: Callable[[int], float]
    profile: AcceptanceProfile
    sizes: Sequence[int]
    max_depth: int
    replan_every: int = 4  # cycles between re-plans (a re-plan costs ~0.5 ms of Python on a 2-core CPU)
    probe: bool = False  # while plain, try the best tree every PROBE_EVERY cycles (drafters cheap to follow)
    history: list[PlanChange] = field(default_factory=list)
    fell_back: bool = False
    _cycle: int = 0
    _plain_cycles: int = 0
    _current: Plan | None = None
    _plain_starts: int = 0  # generations in a row that started plain on carried evidence
    _retry_after: int = 1  # plain starts before the next retry from the prior alone

    def __post_init__(self) -> None:
        sizes = sorted({int(n) for n in self.sizes if n >= 1} | {1})
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        self.sizes = sizes
        self._verify = {n: float(self.verify_cost(n)) for n in sizes}
        self._draft = {d: float(self.draft_cost(d)) for d in range(1, self.max_depth + 1)}
        if any(not math.isfinite(v) or v <= 0 for v in self._verify.values()):
            raise ValueError(f"verification costs must be positive and finite, got {self._verify}")
        if any(not math.isfinite(v) or v < 0 for v in self._draft.values()):
            raise ValueError(f"drafting costs must be >= 0 and finite, got {self._draft}")

    def set_verify_cost(self, verify_cost: Callable[[int], float]) -> Plan | None:
        """Replace the verification cost (a batch's size changed: each sequence's share changed), keeping what this
        generation has learnt; re-plans at once during a generation and returns the new plan (None before one)."""
        costs = {n: float(verify_cost(n)) for n in self.sizes}
        if any(not math.isfinite(v) or v <= 0 for v in costs.values()):
            raise ValueError(f"verification costs must be positive and finite, got {costs}")
        self.verify_cost, self._verify = verify_cost, costs
        return self._replan() if self._current is not None else None

    def verify_seconds(self, num_nodes: int) -> float:
        """The verification cost this planner plans with for a tree of ``num_nodes`` (one of :attr:`sizes`)."""
        return self._verify[num_nodes]

    # ---------------------------------------------------------------- per generation
    def start(self) -> Plan:
        """Begin a generation from the prior and the carried evidence (or, when a retry is due, from the prior
        alone); returns the first plan."""
        if self._current is not None and not self._current.plain and not self.fell_back:
            self._retry_after = 1  # the last generation drafted to its end
        self.profile.reset()
        self.history, self.fell_back, self._cycle, self._plain_cycles = [], False, 0, 0
        self._current = None
        if self._retry_due():
            self.profile.forget_carried()  # the carried evidence may be one unlucky generation's
        return self._replan()

    def _retry_due(self) -> bool:
        """Whether this generation, which the carried evidence would start plain, retries from the prior alone
        (after 1, 2, 4 ... plain starts in a row; a drafter that is probed while plain needs no retry)."""
        if self.probe or not self.profile.carried_trials.any() or not self.best_plan().plain:
            self._plain_starts = 0
            return False
        self._plain_starts += 1
        if self._plain_starts <= self._retry_after:
            return False
        self._plain_starts, self._retry_after = 0, self._retry_after * RETRY_BACKOFF
        return True

    @property
    def current(self) -> Plan:
        return self._current if self._current is not None else self._replan()

    def observe(self, tree: Tree, accepted_path: Sequence[int]) -> Plan:
        """Learn one verification and return the plan for the next cycle."""
        self._cycle += 1
        if self._current is not None and self._current.plain and tree.num_nodes == 1:
            self._plain_cycles += 1
            return self._current
        self.profile.observe(tree, accepted_path)
        if self._cycle % self.replan_every == 0 or self._current is None or self._current.plain:
            self._replan()
        return self._current

    def cycle_budget(self, plan: Plan) -> Plan | None:
        """What the coming cycle drafts, given its ``plan`` (this planner's, or a batch's): the plan itself, one
        level deeper when exploration is due, the best tree when a probe is due while plain, or None to decode
        plainly."""
        if plan.plain:
            return self.probe_plan()
        deeper = plan.depth + 1
        due = (self._cycle + 1) % EXPLORE_EVERY == 0 and deeper <= min(self.max_depth, plan.num_nodes - 1)
        row = min(deeper, MAX_DEPTH) - 1
        if due and self.profile.trials[row, 0] + self.profile.carried_trials[row, 0] < CARRY_TRIALS:
            return Plan(plan.num_nodes, deeper, plan.expected_tokens, plan.cycle_seconds + self._draft[deeper]
                        - self._draft[plan.depth])
        return plan

    def probe_plan(self) -> Plan | None:
        """While decoding plainly: the best tree plan on the cycles when a probe is due (None otherwise)."""
        if not self.probe or self._current is None or not self._current.plain:
            return None
        if (self._plain_cycles + 1) % PROBE_EVERY:
            return None
        trees = [plan for plan in self.candidates() if not plan.plain]
        return max(trees, key=lambda plan: plan.tokens_per_second) if trees else None

    def _replan(self) -> Plan:
        plan = self.best_plan()
        if (plan.plain and not self.probe and self._current is not None and not self._current.plain
                and self.profile.trials[0, 0] < MIN_FALLBACK_TRIALS):
            plan = self._current  # a fallback would be final for this generation: wait for more evidence
        if self._current is None or (plan.num_nodes, plan.depth) != (self._current.num_nodes, self._current.depth):
            self.history.append(PlanChange(self._cycle, plan))
        self._current = plan
        self.fell_back = self.fell_back or plan.plain
        return plan

    # ---------------------------------------------------------------- the choice
    def candidates(self) -> list[Plan]:
        """Every plan considered, plain decoding first."""
        plans = [Plan(1, 0, 1.0, self._verify[1])]
        largest = max(self.sizes)
        p = self.profile.probabilities()
        previous = None
        for depth in range(1, min(self.max_depth, largest - 1) + 1):
            gains = best_tree_gains(p, largest, depth)
            if previous is not None and np.array_equal(gains, previous):
                break  # no tree of the sizes considered reaches this deep: deeper plans only cost more drafting
            previous = gains
            for n in self.sizes:
                if n >= 2 and n - 1 >= depth:  # a tree of n nodes reaches depth n - 1 at most
                    plans.append(Plan(n, depth, 1.0 + gains[n], self._verify[n] + self._draft[depth]))
        return plans

    def best_plan(self) -> Plan:
        """The candidate with the most expected tokens per second (plain decoding wins ties)."""
        return max(self.candidates(), key=lambda plan: (plan.tokens_per_second, plan.plain))


def batch_plan(planners: Sequence[BudgetPlanner], drafting: Sequence[bool]) -> Plan:
    """One budget for every sequence of a batch. A batched forward pads every tree to the largest, so each sequence
    pays for as many rows as the largest tree: the batch gains most from one (nodes, depth) for all, the one with
    the most expected tokens per second over the batch, sum of expected tokens / sum of cycle seconds (each
    sequence's share of the forward plus its drafting; each planner plans with its share, see
    :meth:`BudgetPlanner.set_verify_cost`). A sequence that does not draft (``drafting`` False: its drafter stopped
    following the text) commits one token per cycle and still pays its share of the padded rows. Returns the plan of
    an average sequence of the batch; plain decoding when no sequence drafts."""
    options: dict[tuple[int, int], list[float]] | None = None
    for planner, drafts in zip(planners, drafting):
        if not drafts:
            continue
        plans = {(plan.num_nodes, plan.depth): plan for plan in planner.candidates()}
        sums = options if options is not None else {key: [0.0, 0.0] for key in plans}
        options = {key: [total[0] + plans[key].expected_tokens, total[1] + plans[key].cycle_seconds]
                   for key, total in sums.items() if key in plans}
    if not options:
        return Plan(1, 0, 1.0, sum(planner.verify_seconds(1) for planner in planners) / max(len(planners), 1))
    for planner, drafts in zip(planners, drafting):
        if not drafts:
            for (n, _), total in options.items():
                total[0] += 1.0
                total[1] += planner.verify_seconds(n)
    (n, depth), (tokens, seconds) = max(options.items(), key=lambda item: (item[1][0] / item[1][1], item[0] == (1, 0)))
    return Plan(n, depth, tokens / len(planners), seconds / len(planners))


def interpolate(sizes: Sequence[int], values: Sequence[float]) -> Callable[[int], float]:
    """A cost function from measured points: linear between them, linear extrapolation beyond the last two."""
    xs, ys = np.asarray(sizes, dtype=float), np.asarray(values, dtype=float)
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    if len(xs) == 0:
        raise ValueError("a cost curve needs at least one measured point")

    def cost(n: int) -> float:
        if len(xs) == 1:
            return float(ys[0])
        if n > xs[-1]:
            slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
            return float(ys[-1] + slope * (n - xs[-1]))
        return float(np.interp(n, xs, ys))

    return cost

"""Per-generation statistics, with vLLM's counters and formulas (see verify.py for the vocabulary)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def plan_label(plan: dict) -> str:
    """``plain`` or ``<nodes>n/d<depth>`` for one entry of :attr:`SpecStats.plans`."""
    return "plain" if plan["num_nodes"] == 1 else f"{plan['num_nodes']}n/d{plan['depth']}"


@dataclass
class SpecStats:
    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens returned to the caller (after EOS/stop/budget cuts)
    cycles: int = 0  # draft+verify cycles = target forwards after the prefill
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_cycle: list[int] = field(default_factory=list)
    prefill_time: float = 0.0  # seconds
    draft_time: float = 0.0
    verify_time: float = 0.0
    total_time: float = 0.0
    # the budgets drafted with (the planner's, or a batch's): one entry per change, {"cycle", "num_nodes", "depth",
    # "expected_tokens"}
    plans: list[dict] = field(default_factory=list)
    fell_back: bool = False  # the planner expected no tree to beat plain decoding and decoded plainly
    # per cycle: the drafting seconds since the previous cycle's verification (its drafter update, then this
    # cycle's draft); calibration times drafting depths with it. Not in to_dict.
    cycle_draft_seconds: list[float] = field(default_factory=list, repr=False)
    _draft_time_seen: float = field(default=0.0, repr=False)

    def note_plan(self, plan) -> None:
        """The budget the coming cycle drafts with (a :class:`~.planner.Plan`): recorded when it changes."""
        last = self.plans[-1] if self.plans else None
        if last is None or (last["num_nodes"], last["depth"]) != (plan.num_nodes, plan.depth):
            self.plans.append({"cycle": self.cycles, "num_nodes": plan.num_nodes, "depth": plan.depth,
                               "expected_tokens": round(float(plan.expected_tokens), 3)})
        self.fell_back = self.fell_back or plan.plain

    @property
    def plan_summary(self) -> str:
        """The plans of this generation, e.g. ``4n/d2 -> 6n/d3 (cycle 5)``; ``fixed`` without a planner."""
        if not self.plans:
            return "fixed"
        return " -> ".join(plan_label(p) + (f" (cycle {p['cycle']})" if p["cycle"] else "") for p in self.plans)

    def plan_cycles(self) -> dict[str, int]:
        """Verification cycles spent under each planned budget (``fixed`` when no planner ran)."""
        if not self.plans:
            return {"fixed": self.cycles}
        counts: dict[str, int] = {}
        ends = [p["cycle"] for p in self.plans[1:]] + [self.cycles]
        for plan, end in zip(self.plans, ends):
            counts[plan_label(plan)] = counts.get(plan_label(plan), 0) + max(end - plan["cycle"], 0)
        return {k: v for k, v in counts.items() if v}

    def observe(self, drafted: int, accepted: int) -> None:
        self.cycles += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.accepted_per_cycle.append(accepted)
        self.cycle_draft_seconds.append(self.draft_time - self._draft_time_seen)
        self._draft_time_seen = self.draft_time

    @property
    def target_forwards(self) -> int:
        """Target forward passes, the prefill included (a prompt of one token needs no prefill)."""
        return self.cycles + (1 if self.prompt_tokens > 1 else 0)

    @property
    def mean_accepted_length(self) -> float:
        """Committed tokens per verification forward, bonus token included: 1 + accepted / cycles."""
        return 1.0 + self.accepted_tokens / self.cycles if self.cycles else 0.0

    @property
    def mean_accepted_drafts(self) -> float:
        """Accepted draft tokens per verification forward, bonus token excluded (Falcon's tau)."""
        return self.accepted_tokens / self.cycles if self.cycles else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_time if self.total_time else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["cycle_draft_seconds"], out["_draft_time_seen"]
        for name in ("target_forwards", "mean_accepted_length", "mean_accepted_drafts", "acceptance_rate",
                     "tokens_per_second"):
            out[name] = getattr(self, name)
        return out

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.total_time:.2f}s ({self.tokens_per_second:.1f} tok/s) | "
            f"{self.cycles} target forwards + prefill | mean accepted length {self.mean_accepted_length:.2f} "
            f"(with bonus), {self.mean_accepted_drafts:.2f} (without) | acceptance {self.acceptance_rate:.1%} of "
            f"{self.drafted_tokens} drafted | draft {self.draft_time:.2f}s, verify {self.verify_time:.2f}s | "
            f"plan {self.plan_summary}"
        )

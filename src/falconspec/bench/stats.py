"""Summary statistics of a benchmark: speed-ups with bootstrap confidence intervals, acceptance, equality.

Definitions (one prompt = all turns of one question; the baseline is ``greedy`` of the same dtype and temperature,
or the method ``methods.COMPARED_WITH`` names, e.g. ``llamacpp`` for llama.cpp's speculative methods):

* per-prompt speed-up = (method tokens / method seconds) / (baseline tokens / baseline seconds);
* **median speed-up**: the median of the per-prompt speed-ups; **overall speed-up**: total tokens per total second of
  the method over the same ratio for the baseline. Both get a 95% percentile-bootstrap interval from resampling
  prompts (paired: a resampled prompt brings both its method and baseline timings);
* mean accepted length: the mean of Spec-Bench's ``accept_lengths`` (committed tokens per verification forward, the
  bonus token included; plain decoding = 1.00); without the bonus it is one less;
* acceptance rate: accepted draft tokens / drafted tokens (methods that report both: our engine's, llama.cpp's);
* identical-to-greedy: the share of prompts whose every turn has exactly the baseline's tokens: greedy runs, and
  sampled runs of our engine's methods against its plain decoding (the same seed per prompt and turn draws the
  same tokens whatever the drafter, :mod:`..sampling`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Speedup:
    median: float
    median_ci: tuple[float, float]
    overall: float
    overall_ci: tuple[float, float]
    num_prompts: int  # prompts where both the method and the baseline produced tokens


def bootstrap_ci(statistic, num_samples: int, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``statistic(index)`` over resampled index arrays [resamples, num_samples].

    ``statistic`` maps an int array [R, n] of sample indices to R values (one per resample).
    """
    if num_samples < 1:
        raise ValueError("bootstrap needs at least one sample")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, num_samples, size=(resamples, num_samples))
    values = np.asarray(statistic(index), dtype=float)
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def speedup(tokens: np.ndarray, seconds: np.ndarray, base_tokens: np.ndarray, base_seconds: np.ndarray,
            resamples: int = RESAMPLES, seed: int = 0) -> Speedup:
    """Median and overall speed-up over paired per-prompt arrays [n] of tokens and seconds."""
    arrays = [np.asarray(a, dtype=float) for a in (tokens, seconds, base_tokens, base_seconds)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError("speedup needs four 1-D arrays of the same length (one entry per prompt)")
    valid = (arrays[0] > 0) & (arrays[2] > 0) & (arrays[1] > 0) & (arrays[3] > 0)
    tok, sec, btok, bsec = (a[valid] for a in arrays)
    n = len(tok)
    if n == 0:
        nan = float("nan")
        return Speedup(nan, (nan, nan), nan, (nan, nan), 0)
    ratios = (tok / sec) / (btok / bsec)

    def overall(index):
        return (tok[index].sum(-1) / sec[index].sum(-1)) / (btok[index].sum(-1) / bsec[index].sum(-1))

    return Speedup(
        median=float(np.median(ratios)),
        median_ci=bootstrap_ci(lambda index: np.median(ratios[index], axis=-1), n, resamples, seed=seed),
        overall=float(overall(np.arange(n))),
        overall_ci=bootstrap_ci(overall, n, resamples, seed=seed),
        num_prompts=n,
    )


def summarize(records: dict, baseline: dict, temperature: float, drafter_params: int,
              same_draws: bool = False) -> dict:
    """One summary row for a method from question_id -> PromptRecord maps of the method and the baseline."""
    common = [qid for qid in records if qid in baseline]
    mine = [records[q] for q in common]
    base = [baseline[q] for q in common]
    turns = [t for r in mine for t in r.turns]
    tokens = sum(r.new_tokens for r in mine)
    seconds = sum(r.wall_time for r in mine)
    lengths = [n for t in turns for n in t.accept_lengths]
    mean_length = float(np.mean(lengths)) if lengths else None
    drafted = [t.drafted_tokens for t in turns]
    accepted = [t.accepted_tokens for t in turns]
    engine = bool(turns) and all(d is not None for d in drafted)  # drafts counted (our engine, llama.cpp)
    timed = engine and all(t.draft_time is not None and t.verify_time is not None for t in turns)  # our engine
    speed = speedup(np.array([r.new_tokens for r in mine]), np.array([r.wall_time for r in mine]),
                    np.array([r.new_tokens for r in base]), np.array([r.wall_time for r in base]))
    identical = None
    if mine and (temperature == 0 or same_draws):  # same_draws: sampled, but seeded draws match token for token
        same = sum(all(a.token_ids == b.token_ids for a, b in zip(r.turns, g.turns)) for r, g in zip(mine, base))
        identical = {"count": same, "rate": same / len(mine)}
    rss = [r.peak_rss_mb for r in mine if r.peak_rss_mb is not None]
    plans: dict[str, int] = {}
    for t in turns:
        for key, cycles in (t.plan_cycles or {}).items():
            plans[key] = plans.get(key, 0) + cycles
    return {
        "prompts": len(mine),
        "turns": len(turns),
        "new_tokens": tokens,
        "wall_time": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "speedup": asdict(speed),
        "mean_accepted_length": mean_length,
        "mean_accepted_drafts": None if mean_length is None else mean_length - 1,
        "acceptance_rate": sum(accepted) / sum(drafted) if engine and sum(drafted) else None,
        "drafted_tokens": sum(drafted) if engine else None,
        "identical_to_greedy": identical,
        "draft_time_share": sum(t.draft_time for t in turns) / seconds if timed and seconds else None,
        "verify_time_share": sum(t.verify_time for t in turns) / seconds if timed and seconds else None,
        "peak_rss_mb": max(rss) if rss else None,
        "drafter_params": drafter_params,
        "accept_length_histogram": _histogram(lengths),
        "plan_cycles": dict(sorted(plans.items(), key=lambda kv: -kv[1])) if timed else None,
        "plain_turns": sum(bool((t.plan_cycles or {}).get("plain")) for t in turns) if timed else None,
    }


def _histogram(lengths: list[int]) -> dict[int, int]:
    values, counts = np.unique(np.asarray(lengths, dtype=int), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}

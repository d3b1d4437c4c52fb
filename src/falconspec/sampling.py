"""Sampling parameters and the target distribution they define (temperature, top-k, top-p).

Every valid value gives a proper distribution: a temperature below ``MIN_TEMPERATURE`` is greedy (dividing the
logits by 1e-45 overflows to inf and the softmax to nan; vLLM uses the same 1e-5 cut-off), and top-p always keeps
the most likely token, however small ``top_p`` is (1e-300 is 0 in float32).

Randomness is keyed by position: the token at position ``t`` of a sequence (prompt included) is drawn by inverse
CDF with the uniform :func:`position_uniforms` derives from ``(seed, t)``, whatever else happened before. So a
seeded sequence is the same whether it is decoded plainly or speculatively, with any drafter, tree or budget, alone
or in a batch (see :func:`~.verify.sample_verify`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from .request import check_sampling

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. ``temperature < MIN_TEMPERATURE`` (0 included) means greedy (argmax); top-k/top-p
    then play no part.

    ``top_k == 0`` and ``top_p == 1.0`` disable those filters. ``seed`` keys the uniforms of every position
    (:func:`position_uniforms`); None draws a fresh seed per sequence.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k, self.seed)  # one validator: request.py

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def sequence_seed(self) -> int:
        """The seed of one sequence's uniforms: ``seed``, or a fresh random one when it is None."""
        return secrets.randbits(64) if self.seed is None else self.seed

    def target_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., vocab] logits -> [..., vocab] float32 probabilities after temperature, top-k and top-p."""
        if self.greedy:
            raise ValueError(f"target_probs is for sampling; with temperature < {MIN_TEMPERATURE} use argmax")
        scores = logits.float() / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            sorted_probs = sorted_scores.softmax(-1)
            # drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays)
            mass_above = sorted_probs.cumsum(-1) - sorted_probs
            drop_sorted = mass_above >= self.top_p
            drop_sorted[..., 0] = False  # a top_p below float32's smallest number compares as 0: keep the top token
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return scores.softmax(-1)


MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit integer hash with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def position_uniforms(seed: int, start: int, count: int) -> list[float]:
    """The uniforms in [0, 1) of positions ``start .. start + count - 1`` of the sequence seeded ``seed``: a pure
    function of (seed, position), the same on every device, with 53 random bits each."""
    key = splitmix64(seed & MASK64)
    return [(splitmix64(key ^ position) >> 11) * 2.0 ** -53 for position in range(start, start + count)]


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[..., vocab] probabilities and [...] uniforms in [0, 1) -> [...] token ids: the first token whose cumulative
    probability exceeds ``uniform x total`` (float64, so a token of zero probability is never drawn)."""
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1]
    below_total = torch.nextafter(total, torch.zeros_like(total))  # u x total may round up to total itself
    thresholds = torch.minimum(uniforms.to(cdf.device, torch.float64) * total, below_total)
    return torch.searchsorted(cdf, thresholds.unsqueeze(-1).contiguous(), right=True).squeeze(-1)

"""Sampling parameters and the target distribution they define (temperature, top-k, top-p).

Every valid value gives a proper distribution: a temperature below ``MIN_TEMPERATURE`` is greedy (dividing the
logits by 1e-45 overflows to inf and the softmax to nan; vLLM uses the same 1e-5 cut-off), and top-p always keeps
the most likely token, however small ``top_p`` is (1e-300 is 0 in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import check_sampling

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. ``temperature < MIN_TEMPERATURE`` (0 included) means greedy (argmax); top-k/top-p
    then play no part.

    ``top_k == 0`` and ``top_p == 1.0`` disable those filters. ``seed`` seeds a private ``torch.Generator``.
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

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator

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


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from a [vocab] probability vector."""
    return int(torch.multinomial(probs, 1, generator=generator))

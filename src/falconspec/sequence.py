"""One sequence's decode state, owned by the generation that decodes it.

The target (weights, tokenizer, forwards) and the drafter's weights are shared by every generation on them; what
one sequence changes while it is decoded lives here: the target's KV cache, the committed token ids, the sampling
seed and the drafter's per-sequence state (a drafter of its own from :meth:`~.drafters.base.Drafter.for_sequence`).
Two generations never share a :class:`Sequence`, so they cannot corrupt each other's state; batched verification
(:mod:`.batch`) runs one target forward over several of them, each keeping its own cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .drafters.base import Drafter
from .kv_cache import KVCache
from .sampling import SamplingParams, position_uniforms


@dataclass
class Sequence:
    ids: torch.Tensor  # [L] committed tokens: the prompt, then the accepted ones; the last one, the root, is not cached
    cache: KVCache  # the target's keys and values of ids[:-1] (plus a verified tree's nodes until compaction)
    drafter: Drafter  # this sequence's drafter: shared weights, its own state
    seed: int | None  # keys the sampling uniforms of every position (sampling.position_uniforms); None: greedy

    @classmethod
    def start(cls, target, drafter: Drafter, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """A new sequence of ``prompt_ids`` on ``target``, nothing cached yet."""
        return cls(torch.tensor(prompt_ids, dtype=torch.long), target.new_cache(), drafter.for_sequence(),
                   None if params.greedy else params.sequence_seed())

    @property
    def root(self) -> int:
        return int(self.ids[-1])

    def uniforms(self, count: int) -> torch.Tensor:
        """[count] float64 sampling uniforms of the next ``count`` positions (the root's child first)."""
        return torch.tensor(position_uniforms(self.seed, len(self.ids), count), dtype=torch.float64)

    def commit(self, tokens: list[int]) -> None:
        """Append accepted tokens (their cache entries are kept by the caller's compaction)."""
        self.ids = torch.cat([self.ids, torch.tensor(tokens, dtype=torch.long)])

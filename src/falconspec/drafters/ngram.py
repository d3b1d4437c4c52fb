"""Prompt lookup (n-gram) drafting: no model, no training.

The last ``n`` committed tokens are looked up among earlier positions of the same sequence (prompt and output);
what followed each earlier occurrence becomes a draft. Example with n = 2 and depth 3: committed tokens
``[5, 8, 2, 9, 4, 1, 5, 8]`` end in ``(5, 8)``, seen before at positions 0-1, followed by ``[2, 9, 4]``: the
draft chain is ``8 -> 2 -> 9 -> 4``. Several earlier occurrences with different continuations become a small
tree; longer n-grams are tried first and the most recent occurrences win.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..tree import Tree
from ..verify import Acceptance
from .base import INITIAL_NUM_NODES, Drafter

MAX_DEPTH = 10  # longest continuation drafted


class PromptLookupDrafter(Drafter):
    name = "pld"
    cheap_to_follow = True

    max_planned_depth = MAX_DEPTH

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, depth: int | None = None, max_matches: int = 4,
                 num_nodes: int | None = None):
        """Without ``num_nodes`` and ``depth`` the generator's planner chooses both (see :mod:`.base`)."""
        self.planned = num_nodes is None and depth is None
        depth = MAX_DEPTH if depth is None else depth
        num_nodes = INITIAL_NUM_NODES if num_nodes is None else num_nodes
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        if depth < 1 or max_matches < 1 or num_nodes < 2:
            raise ValueError("depth and max_matches must be >= 1 and num_nodes >= 2")
        self.max_ngram, self.min_ngram, self.depth = max_ngram, min_ngram, depth
        self.max_matches, self.num_nodes = max_matches, num_nodes  # num_nodes: tree size, root included
        self.reset_state()

    def reset_state(self) -> None:
        self.tokens: list[int] = []
        # n -> n-gram -> positions right after its occurrences (where a continuation starts), oldest first
        self.index: dict[int, dict[tuple[int, ...], list[int]]] = {
            n: defaultdict(list) for n in range(self.min_ngram, self.max_ngram + 1)}

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self.reset_state()
        self._extend(input_ids.tolist())

    def _extend(self, new_tokens: list[int]) -> None:
        for tok in new_tokens:
            # the n-grams ending just before this token now have a known continuation: this token
            end = len(self.tokens)
            for n, table in self.index.items():
                if end >= n:
                    table[tuple(self.tokens[end - n:end])].append(end)
            self.tokens.append(tok)

    def propose(self, input_ids: torch.Tensor, max_depth: int) -> Tree:
        assert len(self.tokens) == input_ids.shape[0], "drafter out of sync: call begin() for a new sequence"
        depth = min(self.depth, max_depth)
        continuations: list[list[int]] = []
        if depth > 0:
            for n in range(self.max_ngram, self.min_ngram - 1, -1):
                if len(self.tokens) < n:
                    continue
                for start in reversed(self.index[n].get(tuple(self.tokens[-n:]), ())):
                    cont = self.tokens[start:start + depth]
                    if cont not in continuations:
                        continuations.append(cont)
                    if len(continuations) == self.max_matches:
                        break
                if len(continuations) == self.max_matches:
                    break
        return Tree.merge(self.tokens[-1], continuations, max_nodes=self.num_nodes)

    def observe(self, acceptance: Acceptance, hidden_states: torch.Tensor) -> None:
        self._extend(acceptance.tokens)

"""Drafters that exist only to test the engine: garbage, the truth, and the target drafting for itself."""

import random

import torch

from falconspec.drafters.base import Drafter
from falconspec.tree import Tree


class RandomTreeDrafter(Drafter):
    """Proposes random trees of random tokens: almost everything is rejected."""

    name = "random"

    def __init__(self, vocab_size, seed=0, max_nodes=12, max_depth=5):
        self.vocab_size, self.rng = vocab_size, random.Random(seed)
        self.max_nodes, self.max_depth = max_nodes, max_depth

    def begin(self, input_ids, hidden_states):
        assert hidden_states.shape[0] == input_ids.shape[0] - 1

    def propose(self, input_ids, max_depth):
        sequences = [[self.rng.randrange(self.vocab_size) for _ in range(self.rng.randint(1, self.max_depth))]
                     for _ in range(self.rng.randint(0, 4))]
        return Tree.merge(int(input_ids[-1]), sequences, max_nodes=self.max_nodes)

    def observe(self, acceptance, hidden_states):
        assert hidden_states.shape[0] == len(acceptance.path)


class OracleDrafter(Drafter):
    """Knows the plain greedy continuation; hides it at a random sibling position among decoys."""

    name = "oracle"

    def __init__(self, full_ids, vocab_size, seed=0, depth=6):
        self.full_ids, self.vocab_size, self.rng, self.depth = list(full_ids), vocab_size, random.Random(seed), depth

    def begin(self, input_ids, hidden_states):
        pass

    def propose(self, input_ids, max_depth):
        n = input_ids.shape[0]
        truth = self.full_ids[n:n + self.depth]
        decoys = [[self.rng.randrange(self.vocab_size) for _ in range(3)] for _ in range(self.rng.randint(0, 3))]
        sequences = decoys + [truth]
        self.rng.shuffle(sequences)
        return Tree.merge(int(input_ids[-1]), sequences)

    def observe(self, acceptance, hidden_states):
        pass


class SelfDrafter(Drafter):
    """The target's own top tokens as a two-level tree (top-3, then top-2 under each): plausible drafts."""

    name = "self"

    def __init__(self, target):
        self.model = target.model

    def begin(self, input_ids, hidden_states):
        pass

    @torch.no_grad()
    def propose(self, input_ids, max_depth):
        first = self.model(input_ids=input_ids[None]).logits[0, -1].topk(3).indices.tolist()
        sequences = []
        for tok in first:
            ids = torch.cat([input_ids, torch.tensor([tok])])[None]
            second = self.model(input_ids=ids).logits[0, -1].topk(2).indices.tolist()
            sequences += [[tok, s] for s in second]
        return Tree.merge(int(input_ids[-1]), sequences)

    def observe(self, acceptance, hidden_states):
        pass


def capture_sequences(drafter):
    """A list that collects the per-sequence drafters generators take from ``drafter`` (to inspect their state)."""
    forks = []
    make = drafter.for_sequence

    def for_sequence():
        forks.append(make())
        return forks[-1]

    drafter.for_sequence = for_sequence
    return forks

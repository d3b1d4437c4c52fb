"""The drafter interface shared by n-gram lookup, lookahead, Falcon's SAR drafter, EAGLE-style heads and Medusa heads.

The decode loop talks to a drafter in three calls (and one optional hook):

1. ``begin(input_ids, hidden_states)`` once per sequence, after the target's prefill. ``input_ids`` [L] are the
   committed tokens (the last one, the *root*, is not in the target's cache yet); ``hidden_states`` [L-1, H] are
   the target's last-layer features of the cached tokens ``input_ids[:-1]`` (or, for a drafter that names
   ``feature_layers``, those layers' inputs side by side: [L-1, H * len(feature_layers)]).
2. ``propose(input_ids, max_depth)`` returns a :class:`Tree` rooted at ``input_ids[-1]``, at most ``max_depth``
   deep (deeper nodes would be cut anyway).
3. ``observe(acceptance, hidden_states)`` after verification: ``acceptance.path`` are the accepted tree nodes
   (root first), ``acceptance.tokens`` the committed tokens (accepted drafts + bonus, the bonus being the new
   root), and ``hidden_states`` [a+1, H] the target features of the accepted nodes, which are now cached.

Just before ``observe``, the optional ``observe_forward(tree, logits)`` shows the target's logits [N, vocab] for
every node of the verified tree; only drafters that learn from rejected nodes need it (lookahead's Jacobi window).

**Sequences.** A drafter built by its constructor holds weights and settings, and the state of one sequence.
:meth:`Drafter.for_sequence` gives a drafter for a new sequence that shares the weights and settings (the budget
included) but owns fresh per-sequence state (a SAR drafter's KV cache and last block, the n-gram index, lookahead's
window and pool ...): the generator takes one per generation, so one drafter serves any number of generators and
concurrent sequences. Subclasses put their per-sequence state in :meth:`Drafter.reset_state`.

So at every ``propose`` the drafter has seen one feature per cached position and every committed token: the
(feature h_j, token x_{j+1}) pairs EAGLE and Falcon consume.

**Budgets.** How big a tree to propose (``num_nodes``, root included) and how deep (``depth``) is decided by the
generator's budget planner from this machine's measured costs (:mod:`..planner`), through ``set_budget`` before
each ``propose``. A drafter constructed with an explicit ``num_nodes`` or ``depth`` is not planned
(``planned = False``) and keeps its budget. ``max_planned_depth`` bounds the depths the planner considers.
A drafter whose ``observe`` is free (``cheap_to_follow``: n-gram lookup, lookahead, Medusa) keeps observing while the
planner decodes plainly, and is probed every few cycles.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch

from ..tree import Tree
from ..verify import Acceptance


# The budget a planned drafter holds before the planner's first plan (only seen when it is used without a generator).
# Not a tuned figure: the planner replaces it before the first tree.
INITIAL_NUM_NODES = 8


class Drafter(ABC):
    name: str = "drafter"
    needs_hidden_states: bool = False  # hint: the loop may skip moving features for drafters that ignore them
    # which target features begin/observe receive: None = the last layer after the final norm; a list of layer ids =
    # the inputs of those decoder layers, concatenated (EAGLE-3's fused low/middle/high features)
    feature_layers: list[int] | None = None
    planned: bool = False  # True: the generator's planner sets num_nodes and depth every cycle
    # True when observe() costs next to nothing (no model pass): while the planner decodes plainly, such a drafter
    # keeps following the text and is probed now and then, so it can be switched back on when it would pay
    cheap_to_follow: bool = False
    num_nodes: int = 1
    depth: int = 0
    max_planned_depth: int = 1

    def for_sequence(self) -> Drafter:
        """A drafter for one new sequence: this one's weights and settings, its own per-sequence state."""
        fork = copy.copy(self)  # shallow: weights and settings are shared, read-only while drafting
        fork.reset_state()
        return fork

    def reset_state(self) -> None:
        """Replace every piece of per-sequence state by a fresh one (nothing shared with the copied drafter)."""

    def set_budget(self, num_nodes: int, depth: int) -> None:
        """Propose at most ``num_nodes`` nodes (root included), at most ``depth`` deep, from the next ``propose``."""
        if num_nodes < 1 or depth < 0:
            raise ValueError(f"need num_nodes >= 1 and depth >= 0, got num_nodes={num_nodes}, depth={depth}")
        self.num_nodes, self.depth = int(num_nodes), int(depth)

    @abstractmethod
    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Start a sequence. input_ids: [L]; hidden_states: [L-1, hidden]."""

    @abstractmethod
    def propose(self, input_ids: torch.Tensor, max_depth: int) -> Tree:
        """Draft a tree rooted at input_ids[-1]. input_ids: [L] committed tokens."""

    @abstractmethod
    def observe(self, acceptance: Acceptance, hidden_states: torch.Tensor) -> None:
        """Learn the verification result. hidden_states: [len(acceptance.path), hidden]."""

    def plan_sizes(self) -> list[int] | None:
        """Tree sizes the drafter can fill, for the planner (None: any calibrated size)."""
        return None

    def observe_forward(self, tree: Tree, logits: torch.Tensor) -> None:
        """Optional: the target's logits [tree.num_nodes, vocab] for every node of the tree just verified."""

    def num_parameters(self) -> int:
        """Trainable parameters the drafter adds on top of the target (0 for model-free drafters)."""
        return 0


class NoDrafter(Drafter):
    """Proposes nothing: every cycle is one plain autoregressive step. The baseline in the same engine."""

    name = "none"
    max_planned_depth = 0

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        pass

    def propose(self, input_ids: torch.Tensor, max_depth: int) -> Tree:
        return Tree.root_only(int(input_ids[-1]))

    def observe(self, acceptance: Acceptance, hidden_states: torch.Tensor) -> None:
        pass

"""The drafter interface shared by n-gram lookup, lookahead, Falcon's SAR drafter, EAGLE-style heads and Medusa heads.

The decode loop talks to a drafter in three calls (and one optional hook):

1. ``begin(input_ids, hidden_states)`` once per sequence, after the target's prefill. ``input_ids`` [L] are the
   committed tokens (the last one, the *root*, is not in the target's cache yet); ``hidden_states`` [L-1, H] are
   the target's last-layer features of the cached tokens ``input_ids[:-1]``.
2. ``propose(input_ids, max_depth)`` returns a :class:`Tree` rooted at ``input_ids[-1]``, at most ``max_depth``
   deep (deeper nodes would be cut anyway).
3. ``observe(acceptance, hidden_states)`` after verification: ``acceptance.path`` are the accepted tree nodes
   (root first), ``acceptance.tokens`` the committed tokens (accepted drafts + bonus, the bonus being the new
   root), and ``hidden_states`` [a+1, H] the target features of the accepted nodes, which are now cached.

Just before ``observe``, the optional ``observe_forward(tree, logits)`` shows the target's logits [N, vocab] for
every node of the verified tree; only drafters that learn from rejected nodes need it (lookahead's Jacobi window).

So at every ``propose`` the drafter has seen one feature per cached position and every committed token: the
(feature h_j, token x_{j+1}) pairs EAGLE and Falcon consume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..tree import Tree
from ..verify import Acceptance


def default_num_nodes(device: torch.device | str, dtype: torch.dtype) -> int:
    """Tree size (root included) to verify per target forward when the caller does not choose one.

    A bigger tree accepts a little more but costs more to verify; what pays depends on the cost curve of one
    target forward (``benchmarks/verify_cost.py``). On CPU in float32 up to 4 tokens cost about one plain step and
    6-8 tokens 1.2-1.3x, and on MT-bench the shipped drafters of the built-in model were fastest with 4 nodes
    (``benchmarks/tree_budget.py``). bfloat16 on CPU is flat up to ~8 tokens. Accelerators verify dozens of
    tokens for about the price of one (EAGLE-2 verifies ~60 on GPUs).
    """
    if torch.device(device).type != "cpu":
        return 32
    return 4 if dtype == torch.float32 else 8


class Drafter(ABC):
    name: str = "drafter"
    needs_hidden_states: bool = False  # hint: the loop may skip moving features for drafters that ignore them

    @abstractmethod
    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Start a sequence. input_ids: [L]; hidden_states: [L-1, hidden]."""

    @abstractmethod
    def propose(self, input_ids: torch.Tensor, max_depth: int) -> Tree:
        """Draft a tree rooted at input_ids[-1]. input_ids: [L] committed tokens."""

    @abstractmethod
    def observe(self, acceptance: Acceptance, hidden_states: torch.Tensor) -> None:
        """Learn the verification result. hidden_states: [len(acceptance.path), hidden]."""

    def observe_forward(self, tree: Tree, logits: torch.Tensor) -> None:
        """Optional: the target's logits [tree.num_nodes, vocab] for every node of the tree just verified."""

    def num_parameters(self) -> int:
        """Trainable parameters the drafter adds on top of the target (0 for model-free drafters)."""
        return 0


class NoDrafter(Drafter):
    """Proposes nothing: every cycle is one plain autoregressive step. The baseline in the same engine."""

    name = "none"

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        pass

    def propose(self, input_ids: torch.Tensor, max_depth: int) -> Tree:
        return Tree.root_only(int(input_ids[-1]))

    def observe(self, acceptance: Acceptance, hidden_states: torch.Tensor) -> None:
        pass

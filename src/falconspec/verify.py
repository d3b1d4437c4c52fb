"""Tree verification: decide which drafted tokens the target accepts. Pure functions, no model state.

Vocabulary (used unchanged in stats, benchmarks and /metrics):

* **drafted** tokens: the tree's nodes below the root (``num_nodes - 1`` per cycle);
* **accepted** tokens: drafted tokens on the path the target agrees with;
* **bonus** token: the one token the target adds after the last accepted node (its argmax, or its sample when no
  child holds it), so every cycle commits ``accepted + 1`` tokens;
* **mean accepted length**: committed tokens per target forward = ``1 + accepted / cycles`` (bonus counted);
  ``accepted / cycles`` is the same figure without the bonus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import inverse_cdf_sample
from .tree import Tree


@dataclass(frozen=True)
class Acceptance:
    path: list[int]  # [a + 1] accepted node indices, root first
    tokens: list[int]  # [a + 1] committed tokens: the a accepted drafts, then the bonus token

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1

    @property
    def bonus_token(self) -> int:
        return self.tokens[-1]


def greedy_verify(tree: Tree, target_logits: torch.Tensor) -> Acceptance:
    """Follow the target's argmax down the tree as far as the drafts agree with it.

    target_logits: [num_nodes, vocab]; row i is the target's prediction for the token after node i.
    """
    assert target_logits.shape[0] == tree.num_nodes, (target_logits.shape, tree.num_nodes)
    return follow(tree, target_logits.argmax(-1).tolist())


def sample_verify(tree: Tree, target_probs: torch.Tensor, uniforms: torch.Tensor) -> Acceptance:
    """Follow the target's own samples down the tree; the output is the target's sample, whatever was drafted.

    target_probs: [num_nodes, vocab] float probabilities (already warped by temperature/top-k/top-p);
    uniforms: [>= tree depth + 1] the uniforms of the positions after the root: ``uniforms[d]`` draws the token
    after a node at depth d (:func:`~.sampling.position_uniforms`).

    Every node's next token is drawn from its row by inverse CDF with its position's uniform, and the walk goes
    down while a child holds the drawn token; the first drawn token no child holds is the bonus. The committed
    tokens are therefore exactly those plain sampling draws with the same uniforms: lossless for any drafter,
    and the same sequence for a given seed whatever the drafter, tree or budget. Drafts are fixed candidates, so
    child x of a node is accepted with probability p(x), as in recursive rejection sampling with one-hot drafts
    (SpecInfer): the acceptance rate is that scheme's. One host synchronisation per cycle.
    """
    assert target_probs.shape[0] == tree.num_nodes, (target_probs.shape, tree.num_nodes)
    node_uniforms = torch.as_tensor(uniforms, dtype=torch.float64)[torch.tensor(tree.depth)]  # [num_nodes], host
    return follow(tree, inverse_cdf_sample(target_probs, node_uniforms).tolist())


def follow(tree: Tree, choices: list[int]) -> Acceptance:
    """Walk down from the root while a child holds the target's choice at its parent (``choices[i]``: the token the
    target puts after node i); the choice at the last node reached is the bonus."""
    path = [0]
    while (child := tree.children[path[-1]].get(choices[path[-1]])) is not None:
        path.append(child)
    return Acceptance(path, [tree.tokens[i] for i in path[1:]] + [choices[path[-1]]])

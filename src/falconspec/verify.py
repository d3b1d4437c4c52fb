"""Tree verification: decide which drafted tokens the target accepts. Pure functions, no model state.

Vocabulary (used unchanged in stats, benchmarks and /metrics):

* **drafted** tokens: the tree's nodes below the root (``num_nodes - 1`` per cycle);
* **accepted** tokens: drafted tokens on the path the target agrees with;
* **bonus** token: the one token the target adds after the last accepted node (argmax, or a sample from the
  residual distribution), so every cycle commits ``accepted + 1`` tokens;
* **mean accepted length**: committed tokens per target forward = ``1 + accepted / cycles`` (bonus counted);
  ``accepted / cycles`` is the same figure without the bonus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    argmax = target_logits.argmax(-1).tolist()  # [num_nodes]
    path = [0]
    while (child := tree.children[path[-1]].get(argmax[path[-1]])) is not None:
        path.append(child)
    return Acceptance(path, [tree.tokens[i] for i in path[1:]] + [argmax[path[-1]]])


def sample_verify(tree: Tree, target_probs: torch.Tensor, generator: torch.Generator) -> Acceptance:
    """Multi-candidate recursive rejection sampling over the tree; the output is distributed as the target.

    target_probs: [num_nodes, vocab] float probabilities (already warped by temperature/top-k/top-p).

    Drafts are treated as fixed candidates (a one-hot draft distribution), which keeps this lossless for any
    drafter: at a node with target distribution p, child token x is accepted with probability p(x); on
    rejection p becomes p with x removed, renormalised, and the next child is tried. If every child is
    rejected, the bonus token is drawn from what is left of p. So P(x) = p(x) for every token x.

    One host synchronisation per cycle. Once children x_1..x_{j-1} are rejected, x_j's residual probability is
    p(x_j) / (1 - p(x_1) - ... - p(x_{j-1})), so the tests need only p at the drafted tokens; and a node's bonus, drawn
    when all its children were rejected, comes from p without all of them. So the device draws one uniform per
    drafted node and one bonus candidate per node up front, and the walk down the tree runs on the host.
    """
    assert target_probs.shape[0] == tree.num_nodes, (target_probs.shape, tree.num_nodes)
    device, drafted = target_probs.device, tree.num_nodes - 1
    parents = torch.tensor(tree.parents[1:], dtype=torch.long, device=device)
    tokens = torch.tensor(tree.tokens[1:], dtype=torch.long, device=device)
    residual = target_probs.clone()
    residual[parents, tokens] = 0.0  # every node's p without its children: where its bonus comes from
    empty = residual.sum(-1, keepdim=True) <= 0  # its children held all the mass: never all rejected, never used
    bonus = torch.multinomial(torch.where(empty, target_probs, residual), 1, generator=generator).squeeze(-1)
    uniform = torch.rand(drafted, generator=generator, device=device, dtype=torch.float64)
    values = torch.cat([target_probs[parents, tokens].double(), uniform, bonus.double()]).tolist()  # the one sync
    mass, uniform, bonus = values[:drafted], values[drafted:2 * drafted], [int(b) for b in values[2 * drafted:]]
    path = [0]
    while True:
        node, left, accepted = path[-1], 1.0, None  # left: the probability its rejected children did not take
        for child in tree.children[node].values():
            if mass[child - 1] > 0 and uniform[child - 1] * left < mass[child - 1]:
                accepted = child
                break
            left -= mass[child - 1]
        if accepted is None:
            return Acceptance(path, [tree.tokens[i] for i in path[1:]] + [bonus[node]])
        path.append(accepted)

"""Growing a draft tree block by block, for drafters that emit k token distributions per forward pass.

A drafter pass over one *branch* (a tree node at a depth that is a multiple of k, or the root) yields k
distributions, one per block slot. They are conditionally independent: the slot-1 distribution does not depend
on the slot-0 choice. :meth:`DraftTreeBuilder.grow` turns them into tree nodes: slot 0's top tokens become
children of the branch, and every slot-i node gets slot i+1's top tokens as children. The next pass expands
some of the new slot-(k-1) nodes as branches. Two policies choose what to keep:

* **dynamic** (EAGLE-2 style, the default): a node's score is the cumulative draft log-probability of its path;
  each pass expands the ``branches`` best-scoring candidates, and the final tree keeps the ``num_nodes - 1`` best
  nodes overall (scores never increase along a path, so that set is closed under taking parents);
* **static** (Falcon's trees): a list of rank paths. Path ``[r_1, ..., r_d]`` means: the token at depth t is rank
  r_t of slot ``(t-1) % k`` of the branch above it. Example for k = 2::

      [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]

  is depth 1: ranks 0 and 1 of slot 0 of the first pass; depth 2: ranks 0 and 1 of slot 1 under the rank-0
  token and rank 0 of slot 1 under the rank-1 token (the same slot-1 distribution: SAR drafts are conditionally
  independent inside a block); depth 3: rank 0 of slot 0 of the pass that expands branch [0, 0].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..tree import Tree, TreeError, validate_paths

# Small static trees sized for CPU verification (~16 nodes with the root). Rank paths, see the module docstring.
STATIC_TREES: dict[str, list[list[int]]] = {
    # k = 2, depth 6 (3 drafter passes), 15 drafts
    "k2-16": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0],
              [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
    # k = 1, depth 6 (6 drafter passes), 15 drafts
    "k1-16": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0],
              [0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0]],
}


def check_rank_paths(paths: Sequence[Sequence[int]], max_depth: int | None = None) -> list[tuple[int, ...]]:
    """Validate a static tree of rank paths (no duplicates, every parent listed, ranks >= 0, depth bound)."""
    if not paths:
        raise TreeError("a static tree needs at least one path")
    for path in paths:
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in path):
            raise TreeError(f"path {list(path)} must hold ranks: integers >= 0")
    validate_paths(paths, max_depth)
    return [tuple(p) for p in paths]


@dataclass(frozen=True)
class DraftNode:
    token: int  # target token id
    parent: int  # index of the parent node (-1 for the root)
    depth: int
    score: float  # cumulative draft log-probability of the path from the root
    ranks: tuple[int, ...]  # rank path from the root
    branch: int  # the branch node whose drafter pass produced this node (-1 for the root)


class DraftTreeBuilder:
    """Candidate nodes of one drafting cycle; node 0 is the root. See the module docstring for the policies."""

    def __init__(self, root_token: int, k: int, static_paths: Sequence[tuple[int, ...]] | None = None,
                 max_per_level: int | None = None):
        self.k = k
        self.nodes = [DraftNode(int(root_token), -1, 0, 0.0, (), -1)]
        self.max_per_level = max_per_level  # dynamic policy: keep at most this many nodes per slot level
        self.child_ranks: dict[tuple[int, ...], list[int]] | None = None
        if static_paths is not None:
            self.child_ranks = {}
            for path in static_paths:
                self.child_ranks.setdefault(tuple(path[:-1]), []).append(path[-1])

    @property
    def ranks_needed(self) -> int | None:
        """Static policy: how many top tokens per slot the tree ever reads (None for the dynamic policy)."""
        if self.child_ranks is None:
            return None
        return 1 + max(max(ranks) for ranks in self.child_ranks.values())

    def grow(self, branch: int, top_tokens: list[list[int]], top_logprobs: list[list[float]]) -> list[int]:
        """Add one block of nodes under ``branch``; return the new deepest (slot k-1) nodes.

        top_tokens / top_logprobs: [k][m] per slot, the m best token ids and their log-probabilities, best first
        (one distribution per slot, shared by every parent: the slots are conditionally independent).
        """
        return self.grow_with([branch], lambda slot, parents: ([top_tokens[slot]] * len(parents),
                                                              [top_logprobs[slot]] * len(parents)))

    def grow_with(self, branches: list[int], top_of, slots: int | None = None) -> list[int]:
        """:meth:`grow` for slots whose distribution depends on the node above, one block under each of
        ``branches`` at once, slot by slot: ``top_of(slot, parents)`` is called once per slot with the parent nodes
        of every branch (slot 0: the branches themselves; later slots: nodes whose ``branch`` says which) and
        returns, per parent, its children's m best token ids and log-probabilities ([n][m] each), so that a drafter
        scores a whole pass in one product per slot. The dynamic policy's cap applies per branch. ``slots``: grow
        only the first that many slots of the blocks (a last block the tree's depth cuts). Returns the new deepest
        nodes, branch by branch."""
        levels = [[branch] for branch in branches]
        for slot in range(self.k if slots is None else slots):
            parents = [p for level in levels for p in level]
            tokens_of, logprobs_of = top_of(slot, parents)
            rows = iter(zip(tokens_of, logprobs_of))
            for b, (branch, level) in enumerate(zip(branches, levels)):
                new: list[int] = []
                for parent, (top_tokens, top_logprobs) in zip(level, rows):
                    node = self.nodes[parent]
                    for rank in self._ranks_under(node, len(top_tokens)):
                        new.append(len(self.nodes))
                        self.nodes.append(DraftNode(top_tokens[rank], parent, node.depth + 1,
                                                    node.score + top_logprobs[rank], node.ranks + (rank,), branch))
                if self.max_per_level is not None and len(new) > self.max_per_level:
                    new = sorted(new, key=self._order)[:self.max_per_level]
                levels[b] = new
        return [n for level in levels for n in level]

    def _ranks_under(self, node: DraftNode, available: int) -> list[int]:
        if self.child_ranks is None:
            return list(range(available))
        return [r for r in self.child_ranks.get(node.ranks, ()) if r < available]

    def next_branches(self, candidates: list[int], limit: int) -> list[int]:
        """The candidates the next pass expands: the ``limit`` best (dynamic) or those the static tree extends."""
        if self.child_ranks is None:
            return sorted(candidates, key=self._order)[:limit]
        return [c for c in candidates if self.nodes[c].ranks in self.child_ranks]

    def block_tokens(self, branch: int) -> list[int]:
        """The k tokens of the block ending at ``branch`` (its ancestors down to it, oldest first)."""
        tokens, node = [], branch
        for _ in range(self.k):
            tokens.append(self.nodes[node].token)
            node = self.nodes[node].parent
        return tokens[::-1]

    def ancestors(self, node: int) -> set[int]:
        """``node`` and every node above it."""
        found = set()
        while node >= 0:
            found.add(node)
            node = self.nodes[node].parent
        return found

    def build(self, num_nodes: int, max_depth: int) -> Tree:
        """The final tree: every static node, or the ``num_nodes - 1`` best dynamic ones, down to ``max_depth``."""
        candidates = [i for i in range(1, len(self.nodes)) if self.nodes[i].depth <= max_depth]
        if self.child_ranks is None:
            chosen: set[int] = {0}
            for i in sorted(candidates, key=self._order):
                if len(chosen) >= num_nodes:
                    break
                if self.nodes[i].parent in chosen:
                    chosen.add(i)
            candidates = [i for i in candidates if i in chosen]
        order = [0] + sorted(candidates, key=lambda i: (self.nodes[i].depth, i))
        index = {old: new for new, old in enumerate(order)}
        return Tree(tuple(self.nodes[i].token for i in order),
                    tuple(-1 if i == 0 else index[self.nodes[i].parent] for i in order))

    def _order(self, i: int) -> tuple:
        node = self.nodes[i]
        return -node.score, node.depth, i  # best first; on ties the shallower (so a parent precedes its child)

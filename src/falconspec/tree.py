"""Token trees: the candidates a drafter proposes and the target verifies in one forward pass.

A tree holds ``N`` nodes in topological order. Node 0 is the *root*: the last committed token, which is not
yet in the target's KV cache. Every other node is a draft token whose parent comes earlier in the order.

Worked example (root token 7, drafts "7 -> 3 -> 9" and "7 -> 4")::

    index   0  1  2  3
    tokens  7  3  4  9
    parents -1 0  0  1
    depth   0  1  1  2

With ``P`` tokens already cached, node ``i`` sits at position ``P + depth[i]`` and attends to the whole
prefix plus its ancestors and itself, so node 3 sees nodes 0, 1, 3 but not its uncle 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

import torch


class TreeError(ValueError):
    """A token tree (or a tree of rank paths) is malformed."""


def validate_paths(paths: Sequence[Sequence[Hashable]], max_depth: int | None = None) -> None:
    """Check a list of root-to-node paths: no empty or duplicate path, every proper prefix listed, depth bound.

    The paths may hold tokens or ranks (as in Falcon's static trees, where ``[0, 2]`` means "rank 2 under rank 0").
    """
    seen: set[tuple] = set()
    for i, path in enumerate(paths):
        key = tuple(path)
        if not key:
            raise TreeError(f"path {i} is empty: every path names at least one node below the root")
        if key in seen:
            raise TreeError(f"duplicate path {list(key)} at index {i}: each node must be listed once")
        if max_depth is not None and len(key) > max_depth:
            raise TreeError(f"path {list(key)} has depth {len(key)}, deeper than the limit {max_depth}")
        seen.add(key)
    for key in seen:
        if len(key) > 1 and key[:-1] not in seen:
            raise TreeError(f"path {list(key)} has no parent: {list(key[:-1])} is not listed")


@dataclass(frozen=True)
class Tree:
    tokens: tuple[int, ...]  # [N] token id per node; node 0 is the root
    parents: tuple[int, ...]  # [N] parent index per node; parents[0] == -1 and parents[i] < i
    depth: tuple[int, ...] = field(init=False)  # [N] distance from the root
    children: tuple[dict[int, int], ...] = field(init=False, repr=False)  # per node: child token -> child index

    def __post_init__(self) -> None:
        tokens, parents = tuple(int(t) for t in self.tokens), tuple(int(p) for p in self.parents)
        if not tokens:
            raise TreeError("a tree needs at least the root node")
        if len(tokens) != len(parents):
            raise TreeError(f"tokens ({len(tokens)}) and parents ({len(parents)}) differ in length")
        if parents[0] != -1:
            raise TreeError(f"node 0 is the root and must have parent -1, got {parents[0]}")
        depth = [0]
        children: list[dict[int, int]] = [{} for _ in tokens]
        for i in range(1, len(tokens)):
            p = parents[i]
            if not 0 <= p < i:
                raise TreeError(f"node {i} has parent {p}: a parent must be an earlier node (0 <= parent < {i})")
            if tokens[i] in children[p]:
                raise TreeError(
                    f"duplicate path: nodes {children[p][tokens[i]]} and {i} are both token {tokens[i]} under node {p}"
                )
            children[p][tokens[i]] = i
            depth.append(depth[p] + 1)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "depth", tuple(depth))
        object.__setattr__(self, "children", tuple(children))

    # ---------------------------------------------------------------- builders
    @classmethod
    def root_only(cls, root_token: int) -> Tree:
        return cls((root_token,), (-1,))

    @classmethod
    def chain(cls, root_token: int, draft_tokens: Sequence[int]) -> Tree:
        n = len(draft_tokens)
        return cls((root_token, *draft_tokens), tuple(range(-1, n)))

    @classmethod
    def from_paths(cls, root_token: int, paths: Sequence[Sequence[int]], max_depth: int | None = None) -> Tree:
        """Build from token paths below the root; the list must be prefix-closed and free of duplicates."""
        validate_paths(paths, max_depth)
        ordered = sorted((tuple(p) for p in paths), key=len)
        index = {(): 0}
        tokens, parents = [root_token], [-1]
        for path in ordered:
            index[path] = len(tokens)
            tokens.append(path[-1])
            parents.append(index[path[:-1]])
        return cls(tuple(tokens), tuple(parents))

    @classmethod
    def merge(cls, root_token: int, sequences: Iterable[Sequence[int]], max_nodes: int | None = None) -> Tree:
        """Merge draft sequences into a trie (shared prefixes become shared nodes), stopping at ``max_nodes``."""
        tokens, parents = [root_token], [-1]
        children: list[dict[int, int]] = [{}]
        for seq in sequences:
            node = 0
            for tok in seq:
                tok = int(tok)
                if tok not in children[node]:
                    if max_nodes is not None and len(tokens) >= max_nodes:
                        break
                    children[node][tok] = len(tokens)
                    tokens.append(tok)
                    parents.append(node)
                    children.append({})
                node = children[node][tok]
        return cls(tuple(tokens), tuple(parents))

    # ---------------------------------------------------------------- views
    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depth)

    @property
    def is_chain(self) -> bool:
        """True when node i's parent is i-1 for all i: plain causal attention then equals the tree mask."""
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root down to ``node``, both included."""
        path = [node]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def leaf_paths(self) -> list[list[int]]:
        """Candidate paths: root-to-leaf node indices, one per leaf, in node order."""
        return [self.path_to(i) for i in range(self.num_nodes) if not self.children[i]]

    def truncate(self, max_depth: int) -> Tree:
        """The same tree without nodes deeper than ``max_depth`` (node order kept, parents remapped)."""
        if max_depth < 0:
            raise TreeError(f"max_depth must be >= 0, got {max_depth}")
        if self.max_depth <= max_depth:
            return self
        keep = [i for i in range(self.num_nodes) if self.depth[i] <= max_depth]
        new_index = {old: new for new, old in enumerate(keep)}
        return Tree(
            tuple(self.tokens[i] for i in keep),
            tuple(-1 if i == 0 else new_index[self.parents[i]] for i in keep),
        )

    # ---------------------------------------------------------------- tensors for the target forward
    def token_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.tokens, dtype=torch.long, device=device)  # [N]

    def position_ids(self, prefix_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.depth, dtype=torch.long, device=device) + prefix_len  # [N]

    def ancestor_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[N, N] bool: entry (i, j) is True when node j is node i or one of its ancestors."""
        n = self.num_nodes
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[0, 0] = True
        for i in range(1, n):
            mask[i] = mask[self.parents[i]]
            mask[i, i] = True
        return mask.to(device)

    def attention_mask(
        self, prefix_len: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Additive float mask [1, 1, N, prefix_len + N]: 0 where a node may attend, dtype's minimum elsewhere.

        A float mask, not a bool one: eager attention adds a bool mask as 0/1 numbers (silently wrong logits).
        """
        n = self.num_nodes
        allowed = torch.ones(n, prefix_len + n, dtype=torch.bool, device=device)
        allowed[:, prefix_len:] = self.ancestor_mask(device)
        mask = torch.zeros(n, prefix_len + n, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]

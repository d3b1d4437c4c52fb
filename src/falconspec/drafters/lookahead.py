"""Lookahead decoding (Fu et al., 2024) as a drafter: Jacobi iterations fill an n-gram pool; no model, no training.

The drafter keeps a 2D *window* of guessed tokens, ``N - 1`` levels of ``W`` tokens: the trajectory of the last
Jacobi iterations. Every cycle the window rides along in the verification forward as extra tree nodes. The
target's prediction after each token of the newest level closes one N-gram per column::

    (level 0 [j], level 1 [j], ..., level N-2 [j], prediction [j])

which enters a pool keyed by its first token. Then the levels move down one (level 0 is dropped) and the
predictions become the newest level: one Jacobi step. Pool N-grams that start with the current root token are
the drafts verified beside the window (at most ``guesses`` of them).

The window's attention pattern (the paper's 2D mask) is a token tree: level 0 is a chain below the root, and
level ``l`` column ``j`` hangs below level ``l-1`` column ``j``. So that token sits at depth ``l + j + 1`` and sees
the prefix, level-0 columns ``0..j`` and the earlier levels of its own column, all at consecutive positions.
Example with W = 3, N = 3 (levels a, b; root r)::

    r - a0 - a1 - a2        depth 1 2 3
         |    |    |
         b0   b1   b2       depth 2 3 4   (predictions after b0, b1, b2 land at depths 3, 4, 5)

When one token is committed per cycle, moving the levels down by one is exactly the shift of the positions by
one; when more are committed, the window drifts, as in the authors' implementation: its tokens are guesses that
only feed the pool. Window paths are ordinary candidate paths to the verifier, so whatever the window holds, the
output stays exactly the target's. The Jacobi step reads the target's argmax, also when sampling.
"""

from __future__ import annotations

import random

import torch

from ..tree import Tree
from ..verify import Acceptance
from .base import Drafter


# (window, ngram, guesses) by tree budget, smallest first: the shape lookahead takes for a given number of nodes.
# Which budget pays is the planner's choice from this machine's measured costs, not this table's. (On the 2-core
# AMD EPYC these settings were first measured on, 1:2:2 at 4 nodes was the fastest in float32 and wider windows cost
# more than they gained: benchmarks/results/lookahead-settings.md. The paper uses (15, 5, 15) for 7B models on GPUs.)
SETTINGS_BY_BUDGET = ((1, 2, 1), (1, 2, 2), (2, 3, 1), (3, 4, 2), (5, 4, 3), (8, 4, 4), (15, 5, 15))


RECENT_TOKENS = 256  # committed tokens a restarted window draws its guesses from


def tree_nodes(window: int, ngram: int, guesses: int) -> int:
    """Nodes of a lookahead tree at most: the root, the window and ``guesses`` n-grams of ``ngram - 1`` tokens."""
    return 1 + (window + guesses) * (ngram - 1)


def settings_for_budget(num_nodes: int) -> tuple[int, int, int]:
    """The largest (window, ngram, guesses) of :data:`SETTINGS_BY_BUDGET` whose tree fits ``num_nodes``."""
    fitting = [s for s in SETTINGS_BY_BUDGET if tree_nodes(*s) <= num_nodes]
    if not fitting:
        raise ValueError(f"lookahead needs a tree budget of at least {tree_nodes(*SETTINGS_BY_BUDGET[0])} nodes, "
                         f"got num_nodes={num_nodes}")
    return fitting[-1]


class LookaheadDrafter(Drafter):
    name = "lookahead"
    cheap_to_follow = True

    def __init__(self, window: int | None = None, ngram: int | None = None, guesses: int | None = None,
                 pool_size: int = 8, seed: int = 0, num_nodes: int | None = None):
        """Settings not given come from the tree budget ``num_nodes`` (root included): :func:`settings_for_budget`.
        With none of them given, the generator's planner chooses the budget (see :mod:`.base`)."""
        self.planned = num_nodes is None and window is None and ngram is None and guesses is None
        if num_nodes is None:
            num_nodes = tree_nodes(*SETTINGS_BY_BUDGET[1])
        self.num_nodes = num_nodes
        self.max_planned_depth = max(window + ngram - 2 for window, ngram, _ in SETTINGS_BY_BUDGET)
        if None in (window, ngram, guesses):
            defaults = settings_for_budget(num_nodes)
            window, ngram, guesses = (d if v is None else v for v, d in zip((window, ngram, guesses), defaults))
        if window < 1 or ngram < 2 or guesses < 0 or pool_size < 1:
            raise ValueError(f"lookahead needs window >= 1, ngram >= 2, guesses >= 0 and pool_size >= 1, got "
                             f"window={window}, ngram={ngram}, guesses={guesses}, pool_size={pool_size}")
        self.window, self.ngram, self.guesses, self.pool_size, self.seed = window, ngram, guesses, pool_size, seed
        self.depth = window + ngram - 2  # the window's deepest node
        self.reset_state()

    def reset_state(self) -> None:
        self._recent: list[int] = []  # the last committed tokens, for restarting the window
        self.levels: list[list[int]] = []  # [N-1][W] guessed tokens, level 0 oldest
        self.pool: dict[int, list[tuple[int, ...]]] = {}  # first token -> continuations (N-1 tokens), newest first
        self.steps = 0  # Jacobi steps since begin(); levels hold predictions only after N-2 of them

    def set_budget(self, num_nodes: int, depth: int) -> None:
        """The largest lookahead shape that fits ``num_nodes`` (``depth`` follows from the shape); a new window shape
        restarts the Jacobi window from committed tokens, the n-gram pool is kept."""
        settings = settings_for_budget(max(num_nodes, tree_nodes(*SETTINGS_BY_BUDGET[0])))
        self.num_nodes = num_nodes
        if settings != (self.window, self.ngram, self.guesses):
            self.window, self.ngram, self.guesses = settings
            self.depth = self.window + self.ngram - 2
            if self.levels:
                self._seed_window(self._recent)

    def plan_sizes(self) -> list[int]:
        return [tree_nodes(*s) for s in SETTINGS_BY_BUDGET]

    @property
    def window_nodes(self) -> int:
        """Tree nodes the window adds to every verification forward."""
        return self.window * (self.ngram - 1)

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self._recent = input_ids.tolist()[-RECENT_TOKENS:]
        self.pool = {}
        self._seed_window(self._recent)

    def _seed_window(self, tokens: list[int]) -> None:
        # as in the lookahead authors' code, start from tokens of the prompt at random (seeded: runs are reproducible)
        rng = random.Random(self.seed)
        self.levels = [[rng.choice(tokens) for _ in range(self.window)] for _ in range(self.ngram - 1)]
        self.steps = 0

    def _window_sequences(self) -> list[list[int]]:
        """Root-to-node token paths of the newest level's columns (their prefixes cover the whole window)."""
        base = self.levels[0]
        return [base[:j + 1] + [level[j] for level in self.levels[1:]] for j in range(self.window)]

    def propose(self, input_ids: torch.Tensor, max_depth: int) -> Tree:
        root = int(input_ids[-1])
        guesses = [list(g) for g in self.pool.get(root, ())[:self.guesses]]
        return Tree.merge(root, guesses + self._window_sequences())

    def observe_forward(self, tree: Tree, logits: torch.Tensor) -> None:
        """One Jacobi step from the target's predictions after the newest level's nodes."""
        nodes = [_find(tree, seq) for seq in self._window_sequences()]
        rows = [n for n in nodes if n is not None]  # the loop cuts nodes beyond the remaining token budget
        predicted = iter(logits[rows].argmax(-1).tolist())
        newest = [next(predicted) if n is not None else old for n, old in zip(nodes, self.levels[-1])]
        if self.steps >= self.ngram - 2:  # every level above level 0 is a prediction: the columns are N-grams
            for j, node in enumerate(nodes):
                if node is not None:
                    self._remember(tuple(level[j] for level in self.levels) + (newest[j],))
        self.levels = self.levels[1:] + [newest]
        self.steps += 1

    def _remember(self, gram: tuple[int, ...]) -> None:
        entries = self.pool.setdefault(gram[0], [])
        if gram[1:] in entries:
            entries.remove(gram[1:])
        entries.insert(0, gram[1:])
        del entries[self.pool_size:]

    def observe(self, acceptance: Acceptance, hidden_states: torch.Tensor) -> None:
        self._recent = (self._recent + list(acceptance.tokens))[-RECENT_TOKENS:]


def _find(tree: Tree, tokens: list[int]) -> int | None:
    """The node reached by following ``tokens`` down from the root, or None if the tree stops earlier."""
    node = 0
    for tok in tokens:
        node = tree.children[node].get(tok)
        if node is None:
            return None
    return node

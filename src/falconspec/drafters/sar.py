"""Drafting with Falcon's SAR drafter (k tokens per pass; ``name = "falcon"``) or an EAGLE-style head (k=1, "eagle").

The drafter keeps its own KV cache over the committed positions: pair j = (target feature h_j, token x_{j+1}).
With L committed tokens that is positions 0 .. L-2 (the root x_{L-1} has no target feature yet).

One cycle, k = 2, L committed tokens (P = L-1 cached drafter positions):

1. **Update** (in ``begin`` / ``observe``): the new pairs run through the drafter with their blocks aligned to the
   END of the chunk, so the last block {P-2, P-1} holds the newest token x_{L-1}. If fewer than k pairs are new
   (nothing accepted), the last cached pairs are cropped and fed again so that the last block is complete. The
   last block's outputs o_{P-2}, o_{P-1} predict h_{L-1}, h_L, hence tokens x_L, x_{L+1}: tree depths 1 and 2.
2. **Expansion** (in ``propose``): a chosen depth-2 node b becomes the next block, at positions P, P+1, with inputs
   (o_{P-2}, x_L), (o_{P-1}, x_{L+1}): the drafter's own predicted features and the draft tokens on b's path.
   It attends to every committed position, to the blocks of b's ancestor branches and to its own block, and its
   outputs give depths 3 and 4. Branches of one pass run together in one forward, and their candidates are scored
   together: one head product per block slot (a block the tree's depth cuts scores only its first slots).
3. The expansion KV is cropped after the cycle; only committed positions stay cached.

With ``newest_slots`` the masks are causal and every slot of a block drafts from its newest position's output
(o_{P-1} predicts h_{L-1}, then the chain on the drafted x_L gives h_L): :func:`.sar_model.slot_outputs`. With
``chain_attention`` the chain first attends, per candidate, to the cached keys its block's newest position sees
(``_sees``: every committed position for the root's block, the mask row of the newest position for an expansion).

Which nodes are drafted is :mod:`.trees`' business (dynamic EAGLE-2-style top-k, or a static rank-path tree).
Whatever is proposed, verification keeps the output exactly the target's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..kernels import attach_policy, policy_linear
from ..tree import Tree
from ..verify import Acceptance
from .base import INITIAL_NUM_NODES, Drafter
from .eagle3_model import Eagle3DrafterModel
from .sar_model import (
    ChainReads, SARDrafterModel, additive_mask, attention_block, check_fits, end_aligned_offset, relaxed_causal_mask,
    slot_outputs,
)
from .trees import STATIC_TREES, DraftTreeBuilder, check_rank_paths

MAX_STATIC_DEPTH = 32
MAX_PLANNED_DEPTH = 8  # deepest the planner considers (4 passes of a k=2 drafter)


class SARDrafter(Drafter):
    name = "falcon"
    needs_hidden_states = True

    def __init__(self, model: SARDrafterModel, target, num_nodes: int | None = None, depth: int | None = None,
                 top_k: int = 4, branches: int = 4, static_tree: str | Sequence[Sequence[int]] | None = None):
        """``num_nodes``: tree size with the root (dynamic policy); ``depth``: deepest draft (ceil(depth / k)
        drafter passes; default when only ``num_nodes`` is given: half the drafted nodes, at least one block);
        without both, the generator's planner chooses them every cycle from this machine's measured costs
        (:mod:`.base`). ``top_k``: candidates per block slot; ``branches``: blocks expanded per pass;
        ``static_tree``: a name in ``trees.STATIC_TREES`` or rank paths, replacing the dynamic policy (its own
        depth then bounds ``depth``; a static tree is never planned)."""
        self.planned = num_nodes is None and depth is None and static_tree is None
        self.max_planned_depth = MAX_PLANNED_DEPTH
        if num_nodes is None:
            num_nodes = INITIAL_NUM_NODES
        if depth is None:
            depth = max(model.k, math.ceil((num_nodes - 1) / 2))
        if num_nodes < 1 or depth < 0 or top_k < 1 or branches < 1:
            raise ValueError(f"need num_nodes >= 1, depth >= 0, top_k >= 1 and branches >= 1; got num_nodes="
                             f"{num_nodes}, depth={depth}, top_k={top_k}, branches={branches}")
        check_fits(model.config, target)
        self.model = model  # run under no_grad; its train/eval mode is left as it is (a trainer may share it)
        self.policy = target.matmul_policy  # drafting passes are a few rows each: the paths calibration measured
        attach_policy(model, self.policy)
        self.k = model.k
        self.attention_block = attention_block(model)  # k, or 1 when every slot drafts from the newest position
        self.chain = getattr(model, "chain", None)  # chain_slots: later slots conditioned on the candidate before
        self._attends = getattr(model, "chain_attention", None) is not None  # the chain attends first
        self.name = "falcon" if self.k > 1 else "eagle3" if isinstance(model, Eagle3DrafterModel) else "eagle"
        self.feature_layers = model.feature_layers  # None: the target's last layer
        self.num_nodes, self.depth, self.top_k, self.branches = num_nodes, depth, top_k, branches
        self.static_paths = None
        if static_tree is not None:
            paths = STATIC_TREES.get(static_tree) if isinstance(static_tree, str) else static_tree
            if paths is None:
                raise ValueError(f"unknown static tree {static_tree!r}: choose one of {sorted(STATIC_TREES)}")
            self.static_paths = check_rank_paths(paths, MAX_STATIC_DEPTH)
            self.depth = max(len(p) for p in self.static_paths)
        self.device = target.device
        # the target's frozen tensors: embedding rows are looked up then cast; the head is read in the drafter's dtype
        self.embedding = target.model.get_input_embeddings().weight.detach()  # [V, H]
        self.head = model.head_weight(target.lm_head).detach().to(device=self.device, dtype=model.dtype)  # [D, H]
        self.vocab_ids = None if model.draft_vocab is None else model.draft_vocab.to(self.device)  # [D]
        self.process_logits = target.process_logits
        self.reset_state()

    @classmethod
    def from_pretrained(cls, directory: str | Path, target, dtype: torch.dtype = torch.float32,
                        **options) -> SARDrafter:
        """Load a checkpoint directory (see :class:`SARDrafterModel`) for ``target``, running in ``dtype``."""
        return cls(SARDrafterModel.from_pretrained(directory, target, dtype), target, **options)

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    @property
    def cache_len(self) -> int:
        return self.cache.length

    def reset_state(self) -> None:
        self.cache = self.model.new_cache()
        width = self.model.config.hidden_size * len(self.feature_layers or [None])
        self.tail_features = torch.empty(0, width, device=self.device)  # [<=k, H] the last committed pairs
        self.tail_tokens = torch.empty(0, dtype=torch.long, device=self.device)  # [<=k]
        self.block = None  # [k, H] outputs of the last full block: predicted features of the root's block

    # ---------------------------------------------------------------- committed positions
    @torch.no_grad()
    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """input_ids: [L]; hidden_states: [L-1, F] (target features of input_ids[:-1]; F = H, or one H per fused
        layer for an EAGLE-3 drafter)."""
        assert hidden_states.shape[0] == input_ids.shape[0] - 1, (hidden_states.shape, input_ids.shape)
        self.reset_state()
        self._update(hidden_states, input_ids[1:])

    @torch.no_grad()
    def observe(self, acceptance: Acceptance, hidden_states: torch.Tensor) -> None:
        """hidden_states: [a+1, H], features of the accepted nodes (root first), paired with the committed tokens."""
        assert hidden_states.shape[0] == len(acceptance.tokens), (hidden_states.shape, acceptance.tokens)
        self._update(hidden_states, torch.tensor(acceptance.tokens, dtype=torch.long))

    def _update(self, features: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append pairs (features[i], tokens[i]) [n, H], [n] to the cache; keep the last full block's outputs."""
        features, tokens = features.to(self.device), tokens.to(self.device)
        refeed = min(max(self.k - tokens.shape[0], 0), self.tail_tokens.shape[0])
        if refeed:  # too few new pairs for a whole block: recompute the last cached ones with them
            self.cache.crop_to(self.cache.length - refeed)
        kept = self.tail_tokens.shape[0] - refeed
        features = torch.cat([self.tail_features[kept:], features.to(self.tail_features.dtype)])  # [S, H]
        tokens = torch.cat([self.tail_tokens[kept:], tokens])  # [S]
        self.tail_features = torch.cat([self.tail_features[:kept], features])[-self.k:]
        self.tail_tokens = torch.cat([self.tail_tokens[:kept], tokens])[-self.k:]
        num = tokens.shape[0]
        if num == 0:
            return
        start, offset = self.cache_len, end_aligned_offset(num, self.attention_block)
        mask = relaxed_causal_mask(num, start, self.attention_block, offset, dtype=self.model.dtype, device=self.device)
        out = self._forward(features, tokens, torch.arange(start, start + num, device=self.device), mask, offset)
        self.block = slot_outputs(self.model, out[-self.k:]) if num >= self.k else None

    def _forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, block_offset: int) -> torch.Tensor:
        """One drafter pass on top of the cache. features [S, H], tokens [S], positions [S] -> outputs [S, H]; the
        queries' blocks start ``block_offset`` slots before the first (as in ``mask``)."""
        embeds = self.model.embed(self.embedding, tokens)
        return self.model(features[None], embeds[None], positions[None], mask, self.cache, block_offset=block_offset)[0]

    # ---------------------------------------------------------------- drafting
    @torch.no_grad()
    def propose(self, input_ids: torch.Tensor, max_depth: int) -> Tree:
        if self.cache_len != input_ids.shape[0] - 1:
            raise RuntimeError(f"{self.name} drafter out of sync: {self.cache_len} cached positions for "
                               f"{input_ids.shape[0]} committed tokens; call begin() for a new sequence")
        root, depth = int(input_ids[-1]), min(self.depth, max_depth)
        if self.block is None or depth < 1:
            return Tree.root_only(root)
        builder = DraftTreeBuilder(root, self.k, self.static_paths,
                                   None if self.static_paths is not None else self.num_nodes - 1)
        ranks = builder.ranks_needed or self.top_k
        outputs = {0: self.block}  # branch node -> its block's outputs, the input features of its sub-branches
        prefix_len = self.cache_len
        # chain_attention: branch node -> (the cache positions its block's newest position sees, that position),
        # what its later slots' attention reads
        self._sees = {0: (torch.ones(prefix_len, dtype=torch.bool), prefix_len - 1)} if self._attends else None
        frontier = self._grow(builder, [0], outputs, ranks, depth)
        owners: list[int] = []  # branch node of each expansion entry in the cache, in cache order
        try:
            for step in range(1, math.ceil(depth / self.k)):
                branches = builder.next_branches(frontier, self.branches)
                if not branches:
                    break
                out = self._expand(builder, branches, outputs, prefix_len + (step - 1) * self.k, owners)
                outputs.update(zip(branches, out.split(self.k)))
                frontier = self._grow(builder, branches, outputs, ranks, depth - step * self.k)
        finally:
            self.cache.crop_to(prefix_len)
        return builder.build(self.num_nodes, depth)

    def _expand(self, builder: DraftTreeBuilder, branches: list[int], outputs: dict[int, torch.Tensor],
                first_position: int, owners: list[int]) -> torch.Tensor:
        """One pass over ``branches`` (k positions each, from ``first_position``) -> outputs [len(branches)*k, H]."""
        k, prefix_len = self.k, self.cache_len - len(owners)
        features = torch.cat([outputs[builder.nodes[b].branch] for b in branches])  # [B*k, H]
        tokens = torch.tensor([t for b in branches for t in builder.block_tokens(b)], device=self.device)
        if self.chain is not None:  # later slots' features as drafted: conditioned on the path's tokens
            parents = [builder.nodes[b].branch for b in branches]
            features = self._chained(features.reshape(len(branches), k, -1), tokens.reshape(len(branches), k),
                                     parents).reshape(len(branches) * k, -1)
        positions = first_position + torch.arange(k, device=self.device).repeat(len(branches))
        # mask: every committed position; earlier expansion blocks of ancestor branches; the own block, fully (or
        # causally, when every slot drafts from the newest position)
        num = len(branches) * k
        own = torch.ones(k, k, dtype=torch.bool)
        if self.attention_block == 1:
            own = own.tril()
        allowed = torch.zeros(num, prefix_len + len(owners) + num, dtype=torch.bool)
        allowed[:, :prefix_len] = True
        for i, branch in enumerate(branches):
            rows = slice(i * k, (i + 1) * k)
            above = builder.ancestors(branch)
            allowed[rows, prefix_len:prefix_len + len(owners)] = torch.tensor([o in above for o in owners],
                                                                              dtype=torch.bool)
            allowed[rows, prefix_len + len(owners) + i * k:prefix_len + len(owners) + (i + 1) * k] = own
        mask = additive_mask(allowed.to(self.device)[None, None], self.model.dtype)
        if self._attends:
            self._sees.update((branch, (allowed[(i + 1) * k - 1], first_position + k - 1))
                              for i, branch in enumerate(branches))
        owners += [b for b in branches for _ in range(k)]
        out = self._forward(features, tokens, positions, mask, block_offset=0)
        return slot_outputs(self.model, out.reshape(len(branches), k, -1)).reshape(num, -1)

    def _top(self, outputs: torch.Tensor, m: int) -> list[tuple[list[list[int]], list[list[float]]]]:
        """Per block of k output rows [B*k, H]: the m best target token ids and log-probs per slot ([k][m] lists)."""
        indices, values = self._top_rows(outputs, m)
        return [(indices[i:i + self.k], values[i:i + self.k]) for i in range(0, len(values), self.k)]

    def _top_rows(self, outputs: torch.Tensor, m: int) -> tuple[list[list[int]], list[list[float]]]:
        """Per output row [n, H]: the m best target token ids and their log-probs ([n][m] lists each)."""
        scores = policy_linear(self.model.head_input(outputs), self.head, None, self.policy)  # [n, D]
        # the target's own output processing (soft-capping, scaling): the log-probs that rank the tree's branches
        logprobs = torch.log_softmax(self.process_logits(scores).float(), dim=-1)
        values, indices = logprobs.topk(min(m, logprobs.shape[-1]), dim=-1)
        if self.vocab_ids is not None:
            indices = self.vocab_ids[indices]
        return indices.tolist(), values.tolist()

    def _grow(self, builder: DraftTreeBuilder, branches: list[int], outputs: dict[int, torch.Tensor], m: int,
              depth_left: int) -> list[int]:
        """Grow one block under each of ``branches`` from its outputs [k, H] in ``outputs``, scoring all of them in
        one head product per slot; with chained slots, slot i's candidates under each slot i-1 node come from slot
        i's output conditioned on that node's token, and only the ``depth_left`` first slots are scored."""
        if self.chain is None:  # slots independent of the node above: every slot of every branch in one product
            tops = self._top(torch.cat([outputs[b] for b in branches]), m)
            return [n for branch, top in zip(branches, tops) for n in builder.grow(branch, *top)]

        def top_of(slot: int, parents: list[int]):
            owners = parents if slot == 0 else [builder.nodes[p].branch for p in parents]
            rows = torch.stack([outputs[b][slot] for b in owners])
            if slot:
                previous = torch.tensor([builder.nodes[p].token for p in parents], device=self.device)
                rows = self._chain(rows[:, None], previous[:, None], owners, slot)[:, 0]
            return self._top_rows(rows, m)

        return builder.grow_with(branches, top_of, min(self.k, depth_left))

    def _chained(self, outputs: torch.Tensor, tokens: torch.Tensor, owners: list[int]) -> torch.Tensor:
        """Blocks of outputs [n, k, H] (those of the branch nodes ``owners``) with slots i > 0 conditioned on
        ``tokens`` [n, k] at slot i - 1."""
        later = self._chain(outputs[:, 1:], tokens[:, :-1], owners, 1)
        return torch.cat([outputs[:, :1], later], dim=1)

    def _chain(self, outputs: torch.Tensor, previous: torch.Tensor, owners: list[int], first_slot: int) -> torch.Tensor:
        """Slots ``first_slot``.. [n, s, H] of the blocks of branch nodes ``owners`` from their outputs and the
        tokens [n, s] drafted at the slots before; a chain that attends reads the keys each block's newest position
        sees, at the slots' own positions."""
        embeds = self.model.embed(self.embedding, previous)
        if not self._attends:
            return self.model.chained(outputs, embeds)
        newest = torch.tensor([self._sees[owner][1] for owner in owners])
        reads = ChainReads.from_cache(self.cache, [self._sees[owner][0] for owner in owners], newest, first_slot,
                                      previous.shape[1], self.device)
        return self.model.chained(outputs, embeds, reads)

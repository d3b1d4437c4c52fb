"""Medusa heads: K small heads on the target's last hidden state, each guessing one token further ahead.

Index convention as in :mod:`.sar_model`: h_t is the target's last-layer feature at position t (LM_head(h_t)
predicts x_{t+1}). Head i (0-based) maps h_t to a guess of x_{t+2+i}: one residual SiLU block
``h + SiLU(W h + b)`` per head, then the target's frozen LM head restricted to the draft vocabulary (Medusa-1
trains a separate vocabulary projection per head; sharing the frozen one keeps each head at H*H + H parameters).

Drafting: the root x_{L-1} is the last committed token and h_{L-2} the newest cached feature, so head i applied
to h_{L-2} proposes depth i+1 of the tree. All heads run in one pass and are conditionally independent, like one
block of a SAR drafter with k = K, so :class:`~.trees.DraftTreeBuilder` grows the candidate tree: the best
``num_nodes - 1`` nodes by cumulative log-probability (a Cartesian product of each head's top tokens). Unlike
EAGLE and Falcon the heads never see which token the root actually is; that is the gap those drafters close.

A checkpoint directory holds ``config.json`` (:class:`MedusaConfig`, with the target's identity) and
``model.safetensors`` (the heads and the draft vocabulary index list).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..kernels import attach_policy, policy_linear
from ..tree import Tree
from ..verify import Acceptance
from .base import INITIAL_NUM_NODES, Drafter
from .sar_model import (
    check_fits, config_from_json, draft_head_weight, load_drafter_module, register_draft_vocab, save_drafter_files,
    target_identity,
)
from .trees import DraftTreeBuilder

FORMAT = "falconspec-medusa"


@dataclass
class MedusaConfig:
    hidden_size: int  # the target's hidden size H
    vocab_size: int  # the target's vocabulary size V
    num_heads: int = 4  # K: tokens guessed per pass (depths 1..K)
    draft_vocab_size: int = 0  # 0 = the full vocabulary; else the length of the stored index list
    target_model_type: str = ""
    target_architecture: str = ""
    target_name: str = ""

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} must lie in [0, vocab_size={self.vocab_size}]")

    @classmethod
    def from_json(cls, data: dict, source: str = "config") -> MedusaConfig:
        return config_from_json(cls, data, FORMAT, "Medusa", source)


class MedusaHeads(nn.Module):
    """K residual SiLU blocks over the target feature; logits come from the target's frozen head."""

    def __init__(self, config: MedusaConfig, draft_vocab: Sequence[int] | torch.Tensor | None = None):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(config.num_heads))
        for head in self.heads:  # start as the identity map: every head first guesses like the target's own head
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        register_draft_vocab(self, config, draft_vocab)

    @classmethod
    def for_target(cls, target, num_heads: int = 4, draft_vocab: Sequence[int] | None = None) -> MedusaHeads:
        return cls(MedusaConfig(**target_identity(target), num_heads=num_heads), draft_vocab).to(target.device)

    @classmethod
    def from_pretrained(cls, directory: str | Path, target, dtype: torch.dtype = torch.float32) -> MedusaHeads:
        return load_drafter_module(cls, MedusaConfig, directory, target, dtype, "Medusa")

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_drafter_files(self, directory, {"format": FORMAT, **dataclasses.asdict(self.config)})

    @property
    def dtype(self) -> torch.dtype:
        return self.heads[0].weight.dtype

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., H] -> per-head predicted features [..., K, H] (feed them to the frozen head)."""
        features = features.to(self.dtype)
        return torch.stack([features + nn.functional.silu(head(features)) for head in self.heads], dim=-2)

    def head_weight(self, lm_head: nn.Module | torch.Tensor) -> torch.Tensor:
        """The rows [D, H] of the target's LM head weight [V, H] the heads score."""
        return draft_head_weight(lm_head, self.draft_vocab)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MedusaDrafter(Drafter):
    """Proposes a tree from the K heads' top tokens over the newest cached target feature."""

    name = "medusa"
    cheap_to_follow = True
    needs_hidden_states = True

    def __init__(self, model: MedusaHeads, target, num_nodes: int | None = None, depth: int | None = None,
                 top_k: int = 4):
        """``num_nodes``: tree size with the root; ``depth``: heads used; ``top_k``: candidates per head. Without
        ``num_nodes`` and ``depth`` the generator's planner chooses both (see :mod:`.base`)."""
        self.planned = num_nodes is None and depth is None
        self.max_planned_depth = model.config.num_heads
        num_nodes = INITIAL_NUM_NODES if num_nodes is None else num_nodes
        depth = model.config.num_heads if depth is None else depth
        if num_nodes < 1 or top_k < 1 or not 0 <= depth <= model.config.num_heads:
            raise ValueError(f"need num_nodes >= 1, top_k >= 1 and 0 <= depth <= {model.config.num_heads} heads; got "
                             f"num_nodes={num_nodes}, top_k={top_k}, depth={depth}")
        check_fits(model.config, target)
        self.model, self.num_nodes, self.depth, self.top_k = model, num_nodes, depth, top_k
        self.policy = target.matmul_policy  # the product paths calibration measured for this machine
        attach_policy(model, self.policy)
        self.head = model.head_weight(target.lm_head).detach().to(device=target.device, dtype=model.dtype)  # [D, H]
        self.vocab_ids = None if model.draft_vocab is None else model.draft_vocab.to(target.device)  # [D]
        self.process_logits = target.process_logits  # the target's own output processing (soft-capping, scaling)
        self.reset_state()

    def reset_state(self) -> None:
        self.last_feature: torch.Tensor | None = None  # [H] h_{L-2}, the feature that predicted the root

    @classmethod
    def from_pretrained(cls, directory: str | Path, target, dtype: torch.dtype = torch.float32,
                        **options) -> MedusaDrafter:
        return cls(MedusaHeads.from_pretrained(directory, target, dtype), target, **options)

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """input_ids: [L]; hidden_states: [L-1, H] (features of input_ids[:-1]; empty for a one-token prompt)."""
        self.last_feature = hidden_states[-1] if hidden_states.shape[0] else None

    def observe(self, acceptance: Acceptance, hidden_states: torch.Tensor) -> None:
        """hidden_states: [a+1, H]; the last one is the feature of the node that predicted the new root."""
        self.last_feature = hidden_states[-1]

    @torch.no_grad()
    def propose(self, input_ids: torch.Tensor, max_depth: int) -> Tree:
        root = int(input_ids[-1])
        depth = min(self.depth, max_depth)
        if self.last_feature is None or depth < 1:
            return Tree.root_only(root)
        guesses = self.model(self.last_feature[None])[0, :depth]  # [depth, H]
        scores = self.process_logits(policy_linear(guesses, self.head, None, self.policy))  # [depth, D]
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        values, indices = logprobs.topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
        if self.vocab_ids is not None:
            indices = self.vocab_ids[indices]
        builder = DraftTreeBuilder(root, depth, max_per_level=self.num_nodes - 1)
        builder.grow(0, indices.tolist(), values.tolist())
        return builder.build(self.num_nodes, depth)

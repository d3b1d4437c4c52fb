"""An EAGLE-3 drafter network, stored in EAGLE-3's own checkpoint layout so vLLM, SGLang and llama.cpp can load it.

Architecture (EAGLE-3, Li et al. 2025; the layout of the authors' checkpoints, vLLM's ``LlamaForCausalLMEagle3``
and SGLang's ``LlamaForCausalLMEagle3``), one autoregressive step (k = 1):

* **fusion** ``fc``: Linear(3H -> H, no bias) over the concatenated hidden states of three target layers (a low, a
  middle and a high one; ``feature_layers``, by default (2, L // 2, L - 3)). A layer id i means the INPUT of target
  decoder layer i (the residual stream after layers 0..i-1), vLLM's ``aux_hidden_state_layers`` convention.
* **one decoder layer** ``midlayer`` whose attention reads [input_layernorm(embedding(x_{j+1})); hidden_norm(g_j)]
  (width 2H, embedding first), with the fused feature g_j (pre-norm) as the residual, then the usual MLP block.
* **head**: ``norm`` then ``lm_head`` [D, H] over a reduced draft vocabulary; draft id d is target token
  ``d + d2t[d]``; ``t2d`` [V] marks the target tokens that have a draft id.

The output o_j (pre-norm, [.., H]) predicts x_{j+2} through the head and is also the drafter's own feature for the
next step: a later step feeds o_j where the fused target feature would be (width H, so ``fc`` is skipped), as in
EAGLE-3's training-time test. This is :class:`~.sar.SARDrafter`'s contract with k = 1, so the same drafting code
runs both (``features`` of width 3H from the target, H from the drafter itself).

A checkpoint directory holds ``config.json`` (:class:`Eagle3Config`, format ``falconspec-eagle3``, with the target's
identity) and ``model.safetensors`` with exactly EAGLE-3's tensor names (``fc.weight``, ``midlayer.*``,
``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``); the target's embedding is shared, not stored.
``falconspec export --format eagle3`` writes the Hugging Face config those engines read beside the same tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from ..kv_cache import KVCache, forward_kwargs
from .sar_model import (
    additive_mask, check_draft_vocab, config_from_json, embed_tokens, load_drafter_module, save_drafter_files,
    target_identity,
)

FORMAT = "falconspec-eagle3"


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high layers: (2, L // 2, L - 3); (0, L // 2, L - 1) for targets too shallow to
    give three distinct ones that way (and fewer than three only below three layers)."""
    for ids in ((2, num_layers // 2, num_layers - 3), (0, num_layers // 2, num_layers - 1)):
        if len(set(ids)) == 3 and min(ids) >= 0:
            return list(ids)
    return list(range(num_layers))


@dataclass
class Eagle3Config:
    hidden_size: int  # the target's H
    vocab_size: int  # the target's V
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    feature_layers: list[int]  # target layers whose inputs are fused (vLLM's eagle_aux_hidden_state_layer_ids)
    num_target_layers: int
    draft_vocab_size: int = 0  # 0: the whole vocabulary
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 4096
    target_model_type: str = ""
    target_architecture: str = ""
    target_name: str = ""

    def __post_init__(self) -> None:
        self.feature_layers = [int(i) for i in self.feature_layers]
        if not self.feature_layers or any(not 0 <= i < self.num_target_layers for i in self.feature_layers):
            raise ValueError(f"feature_layers {self.feature_layers} must be target layer ids in "
                             f"[0, {self.num_target_layers})")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} must lie in [0, vocab_size={self.vocab_size}]")

    @property
    def k(self) -> int:
        return 1

    @property
    def feature_size(self) -> int:
        return len(self.feature_layers) * self.hidden_size

    def to_llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=1, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=1, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_parameters=dict(self.rope_parameters), max_position_embeddings=self.max_position_embeddings,
            attention_bias=False, attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )

    def to_json(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, source: str = "config") -> Eagle3Config:
        return config_from_json(cls, data, FORMAT, "EAGLE-3", source)


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention over [norm(embedding); norm(feature)] (2H wide), the feature as residual."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx=0)
        for name in ("q_proj", "k_proj", "v_proj"):  # the projections read both halves
            old = getattr(self.self_attn, name)
            setattr(self.self_attn, name, nn.Linear(2 * hidden, old.out_features, bias=False))
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, position_embeddings, attention_mask: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        both = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        attended, _ = self.self_attn(both, position_embeddings=position_embeddings, attention_mask=attention_mask,
                                     **forward_kwargs(self.self_attn.forward, cache))
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3DrafterModel(nn.Module):
    """``fc`` (3H -> H), ``midlayer``, ``norm`` and ``lm_head`` over the draft vocabulary; see the module docstring."""

    def __init__(self, config: Eagle3Config, draft_vocab: Sequence[int] | torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.llama_config = config.to_llama_config()
        hidden = config.hidden_size
        if draft_vocab is None and not config.draft_vocab_size:
            draft_vocab = range(config.vocab_size)
        if draft_vocab is not None:
            ids = check_draft_vocab(list(draft_vocab), config.vocab_size)
            config.draft_vocab_size = len(ids)
        else:  # loading a checkpoint fills these in
            ids = torch.arange(config.draft_vocab_size)
        self.fc = nn.Linear(config.feature_size, hidden, bias=False)
        self.midlayer = Eagle3Layer(self.llama_config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        self.register_buffer("d2t", ids - torch.arange(len(ids)))  # target id = draft id + d2t[draft id]
        self.register_buffer("t2d", t2d)
        # not a submodule: model.to(bfloat16) must not round the RoPE frequencies
        object.__setattr__(self, "rotary", LlamaRotaryEmbedding(self.llama_config))

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_target(cls, target, feature_layers: Sequence[int] | None = None,
                   draft_vocab: Sequence[int] | None = None) -> Eagle3DrafterModel:
        """An untrained drafter shaped like ``target``'s layers. It starts as a shortcut through the target: ``fc``
        passes the highest fused layer through, the decoder layer adds nothing (its output projections are zero, as
        a residual branch starts), and the head is the target's final norm and head rows, so its first guesses are
        the target's own reading of that layer. Training then learns the rest."""
        tcfg = target.config
        heads = tcfg.num_attention_heads
        num_layers = tcfg.num_hidden_layers
        config = Eagle3Config(
            **target_identity(target), intermediate_size=tcfg.intermediate_size, num_attention_heads=heads,
            num_key_value_heads=getattr(tcfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads,
            feature_layers=sorted(feature_layers) if feature_layers is not None else default_feature_layers(num_layers),
            num_target_layers=num_layers, rms_norm_eps=float(getattr(tcfg, "rms_norm_eps", 1e-6)),
            rope_parameters=dict(getattr(tcfg, "rope_parameters", None) or {"rope_type": "default",
                                                                          "rope_theta": 10000.0}),
            max_position_embeddings=target.max_context,
        )
        model = cls(config, draft_vocab)
        with torch.no_grad():
            hidden = config.hidden_size
            model.fc.weight.zero_()
            model.fc.weight[:, -hidden:] = torch.eye(hidden)  # feature_layers are listed low to high
            model.midlayer.self_attn.o_proj.weight.zero_()
            model.midlayer.mlp.down_proj.weight.zero_()
            model.lm_head.weight.copy_(target.lm_head.weight[model.draft_vocab].float())
            final_norm = getattr(target.decoder, "norm", None)
            if final_norm is not None and getattr(final_norm, "weight", None) is not None:
                model.norm.weight.copy_(final_norm.weight.float())
        return model.to(target.device)

    @classmethod
    def from_pretrained(cls, directory: str | Path, target, dtype: torch.dtype = torch.float32) -> Eagle3DrafterModel:
        return load_drafter_module(cls, Eagle3Config, directory, target, dtype, "EAGLE-3 drafter")

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_drafter_files(self, directory, self.config.to_json())

    # ---------------------------------------------------------------- the contract SARDrafter drafts with
    @property
    def k(self) -> int:
        return 1

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def feature_layers(self) -> list[int]:
        return self.config.feature_layers

    @property
    def draft_vocab(self) -> torch.Tensor:
        """[D] the target token id of each draft id."""
        return torch.arange(self.d2t.shape[0], device=self.d2t.device) + self.d2t

    def new_cache(self) -> KVCache:
        return KVCache(self.llama_config)

    def embed(self, embedding: nn.Embedding | torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return embed_tokens(embedding, ids, self.dtype)

    def forward(self, features: torch.Tensor, token_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_key_values: KVCache | None = None,
                block_offset: int | torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, S, 3H] (fused target layers) or [B, S, H] (the drafter's own outputs), token_embeds
        [B, S, H] of x_{j+1} -> outputs o_j [B, S, H] (pre-norm; the head reads ``head_input(o)``). ``block_offset``
        and ``lengths`` are the SAR drafter's (k=1: every block is one position), accepted and unused."""
        hidden = self.config.hidden_size
        if features.shape[-1] not in (hidden, self.config.feature_size) or token_embeds.shape[-1] != hidden:
            raise ValueError(f"features must be [B, S, {self.config.feature_size}] or [B, S, {hidden}] and "
                             f"token_embeds [B, S, {hidden}]; got {tuple(features.shape)}, {tuple(token_embeds.shape)}")
        dtype = self.dtype
        if attention_mask.dtype != dtype:
            attention_mask = additive_mask(attention_mask == 0, dtype)
        features = features.to(dtype)
        if features.shape[-1] != hidden:
            features = self.fc(features)
        position_embeddings = self.rotary(features, position_ids)
        return self.midlayer(token_embeds.to(dtype), features, position_embeddings, attention_mask, past_key_values)

    def head_input(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.norm(outputs)

    def head_weight(self, lm_head: nn.Module | torch.Tensor | None = None) -> torch.Tensor:
        """Its own head [D, H] (the target's is not used)."""
        return self.lm_head.weight

    def logits(self, outputs: torch.Tensor, lm_head: nn.Module | torch.Tensor | None = None) -> torch.Tensor:
        """Draft logits [.., D] of outputs [.., H]; entry d is target token ``draft_vocab[d]``."""
        return self.lm_head(self.norm(outputs))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_drafter(directory: str | Path, target, dtype: torch.dtype = torch.float32, **options):
    """A drafter over the EAGLE-3 checkpoint in ``directory``: it drafts like a k=1 SAR drafter
    (:class:`~.sar.SARDrafter`); ``options`` go to that."""
    from .sar import SARDrafter

    return SARDrafter(Eagle3DrafterModel.from_pretrained(directory, target, dtype), target, **options)

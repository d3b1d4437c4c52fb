"""Falcon's semi-autoregressive (SAR) drafter network: config, module, relaxed causal mask, checkpoints.

API for training and drafting (k = tokens per block; k=1 is an EAGLE-style autoregressive head)
-------------------------------------------------------------------------------------------------
Index convention: x_0, x_1, ... are the tokens, h_t the target's last-layer hidden state after the final norm at
position t (what its LM head reads, so LM_head(h_t) predicts x_{t+1}).

``SARDrafterModel.forward(features, token_embeds, position_ids, attention_mask, past_key_values=None,
block_offset=None, lengths=None)``

* ``features``       [B, S, H]  f_j: the target's h_j (or, while drafting, the drafter's own prediction of it)
* ``token_embeds``   [B, S, H]  the target's (frozen) input embedding of x_{j+1}, the token ONE STEP AHEAD of f_j;
                                 ``model.embed(target_embedding, ids)`` does the lookup and the dtype cast
* ``position_ids``   [B, S]     j (absolute position of the pair; cached positions come first)
* ``attention_mask`` [B|1, 1, S, P+S] additive float mask from :func:`relaxed_causal_mask` (P = cached positions)
* ``past_key_values`` a cache from ``model.new_cache()`` (grown in place by S) or None (training)
* ``block_offset``   the mask's block alignment (int, or [B] ints); needed by a drafter with ``newest_pair``, whose
                     slots also read their block's last pair (:func:`block_last_index`; ``lengths`` [B]: real
                     positions per row of a right-padded batch, so a cut block reads its last real pair)
* returns            [B, S, H]  o_j, regressing h_{j+k}; ``model.logits(o, target_lm_head_weight)`` gives
                                 [B, S, D] logits over the draft vocabulary (D = V, or the reduced draft vocabulary),
                                 predicting x_{j+k+1}

Training pairs for one sequence of length L (teacher forcing): features h[0:L-1], tokens x[1:L], targets h[k:L]
for the first L-k positions. Build the mask with ``relaxed_causal_mask(L-1, 0, k, block_offset=...)``; a random
``block_offset`` per sample (an int tensor [B] in [0, k)) trains every slot alignment; drafting always aligns the
last block to the end of the chunk (``end_aligned_offset``). ``block_offset`` = how many slots of the first block
lie before the first position, so 0 = blocks start at position 0 (Falcon's alignment).

With ``newest_slots`` (our layout, not the paper's) the mask is the plain causal one (:func:`attention_block` is
1), o_j regresses h_{j+1} as a head's output does, and every slot of a block drafts from its newest position's
output (:func:`slot_outputs`), slot i > 0 through the chain on slot i - 1's token: the first token of each pass is
drafted as the head drafts it, the later ones by the chain, one pass per k tokens all the same. With
``reversed_slots`` (ours too) the mask stays relaxed and slot s is drafted from a block's position k-1-s, which
regresses h_{j+2s+1} (:func:`regress_ahead`).

Create an untrained drafter with ``SARDrafterModel.for_target(target, k=2, num_layers=2, draft_vocab=ids)``
(``most_frequent_tokens(counts, size, always=eos_ids)`` picks the ids), save it with ``save_pretrained(dir)`` and
load it with ``SARDrafterModel.from_pretrained(dir, target)``.

The target's embedding and LM head are never stored here: they are passed in, frozen. A checkpoint directory holds
``config.json`` (:class:`SARConfig`, including the target's identity) and ``model.safetensors`` (fusion, decoder
layers and, if any, the ``draft_vocab`` index list).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding, apply_rotary_pos_emb

from ..adapter import check_feature_layers
from ..kv_cache import KVCache, forward_kwargs


log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "falconspec-sar"


class DrafterMismatchError(ValueError):
    """A drafter checkpoint does not fit the target it is loaded for."""


# ----------------------------------------------------------------------------- relaxed causal mask
def end_aligned_offset(num_queries: int, k: int) -> int:
    """The ``block_offset`` that makes the last block end exactly at the last query (``(-S) mod k``)."""
    return (-num_queries) % k


def relaxed_causal_allowed(num_queries: int, num_cached: int = 0, k: int = 2,
                           block_offset: int | torch.Tensor = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B|1, S, P+S] bool: may query q attend to key j?

    Every cached key (j < P) is visible. Among the S new positions, query q sits in block
    ``(q + block_offset) // k`` and sees new key j iff j's block is not later than its own: full attention inside a
    block, causal across blocks. ``block_offset`` in [0, k) is the number of (virtual) slots before the first query
    in its block, so the first block holds ``k - block_offset`` queries; an int tensor [B] gives one offset per row.

    Worked example, S=5, k=2, P=1 (column 0 is the cached key)::

        block_offset=0 (start-aligned)      block_offset=1 (end-aligned: the last two queries share a block)
        q0: 1 1 1 0 0 0                      q0: 1 1 0 0 0 0
        q1: 1 1 1 0 0 0                      q1: 1 1 1 1 0 0
        q2: 1 1 1 1 1 0                      q2: 1 1 1 1 0 0
        q3: 1 1 1 1 1 0                      q3: 1 1 1 1 1 1
        q4: 1 1 1 1 1 1                      q4: 1 1 1 1 1 1

    With k=1 both are the plain causal mask.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    offset = torch.as_tensor(block_offset, dtype=torch.long, device=device).reshape(-1, 1)  # [B|1, 1]
    if bool(((offset < 0) | (offset >= k)).any()):
        raise ValueError(f"block_offset must lie in [0, k={k}), got {block_offset}")
    block = block_index(num_queries, k, offset, device)  # [B|1, S]
    new = block[:, None, :] <= block[:, :, None]  # [B|1, S(query), S(key)]
    cached = torch.ones(new.shape[0], num_queries, num_cached, dtype=torch.bool, device=device)
    return torch.cat([cached, new], dim=-1)


def _aligned_positions(num_queries: int, block_offset: int | torch.Tensor, device) -> torch.Tensor:
    """[B|1, S] long: query positions counted from the (virtual) start of the first block."""
    offset = torch.as_tensor(block_offset, dtype=torch.long, device=device).reshape(-1, 1)  # [B|1, 1]
    return torch.arange(num_queries, device=device)[None] + offset


def block_index(num_queries: int, k: int, block_offset: int | torch.Tensor = 0,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """[B|1, S] long: each query's block (the blocks of :func:`relaxed_causal_allowed`). E.g. S=5, k=2, offset 1 ->
    [0, 1, 1, 2, 2]."""
    return _aligned_positions(num_queries, block_offset, device) // k


def block_slots(num_queries: int, k: int, block_offset: int | torch.Tensor = 0,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """[B|1, S] long: each query's slot in its block (the blocks of :func:`relaxed_causal_allowed`; 0 = a block's
    first position). E.g. S=5, k=2, offset 1 -> [1, 0, 1, 0, 1]."""
    return _aligned_positions(num_queries, block_offset, device) % k


def block_last_index(num_queries: int, k: int, block_offset: int | torch.Tensor = 0,
                     lengths: torch.Tensor | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B|1, S] long: the index of the last query of each query's block (the blocks of
    :func:`relaxed_causal_allowed`), cut at the last query, or at ``lengths - 1`` per row when given: the block's
    newest pair. E.g. S=5, k=2: offset 0 -> [1, 1, 3, 3, 4]; offset 1 -> [0, 2, 2, 4, 4]."""
    queries = torch.arange(num_queries, device=device)[None]
    last = queries + (k - 1) - block_slots(num_queries, k, block_offset, device)  # [B|1, S]
    limit = (num_queries if lengths is None else lengths.to(device).reshape(-1, 1).clamp(1, num_queries)) - 1
    return torch.minimum(last, torch.as_tensor(limit, device=device))


def attention_block(model) -> int:
    """The block size of a drafter's attention mask (:func:`relaxed_causal_mask`): its k, or 1 (the plain causal
    mask) when every slot drafts from the newest position (``newest_slots``). Any drafter module (an EAGLE-3 one
    has k = 1)."""
    return 1 if getattr(model.config, "newest_slots", False) else model.k


def slot_outputs(model, blocks: torch.Tensor) -> torch.Tensor:
    """The outputs that draft a block's k slots, before any chaining, from the pass outputs of whole blocks
    [.., k, H] (positions in order): the outputs themselves, the newest position's output in every slot
    (``newest_slots``), or the outputs in reverse (``reversed_slots``)."""
    if getattr(model.config, "newest_slots", False):
        return blocks[..., -1:, :].expand_as(blocks)
    if getattr(model.config, "reversed_slots", False):
        return blocks.flip(-2)
    return blocks


def drafted_slots(config, num_queries: int, block_offset: int | torch.Tensor = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[B|1, S] long: the slot (0 = the block's first drafted token) each query's output drafts, under the relaxed
    causal mask with blocks aligned by ``block_offset``: its place in its block, or (``reversed_slots``) k - 1 minus
    that."""
    place = block_slots(num_queries, config.k, block_offset, device)
    return config.k - 1 - place if config.reversed_slots else place


def regress_ahead(config, num_queries: int, block_offset: int | torch.Tensor = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[B|1, S] long: how far ahead of its own position each query's output regresses (o_j ≈ h_{j+a}): k in the
    paper's layout; 2s + 1 for the query drafting slot s with ``reversed_slots`` (its block's newest position is
    s places later, and slot s drafts s + 1 tokens past it)."""
    if config.reversed_slots:
        return 2 * drafted_slots(config, num_queries, block_offset, device) + 1
    return torch.full((1, num_queries), config.k, dtype=torch.long, device=device)


def relaxed_causal_mask(num_queries: int, num_cached: int = 0, k: int = 2, block_offset: int | torch.Tensor = 0,
                        key_padding: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive float mask [B|1, 1, S, P+S]: 0 where allowed (see :func:`relaxed_causal_allowed`), dtype min elsewhere.

    ``key_padding`` [B, P+S] bool (True = real token) hides padded keys in a right-padded training batch.
    """
    allowed = relaxed_causal_allowed(num_queries, num_cached, k, block_offset, device)
    if key_padding is not None:
        allowed = allowed & key_padding.to(device=device, dtype=torch.bool)[:, None, :]
    return additive_mask(allowed[:, None], dtype)


def embed_tokens(embedding: nn.Embedding | torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Look ``ids`` [..] up in the target's embedding (module or weight [V, H]); [.., H] in ``dtype``."""
    weight = embedding.weight if isinstance(embedding, nn.Module) else embedding
    return nn.functional.embedding(ids.to(weight.device), weight).to(dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive float mask (0 / dtype min) of the same shape."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------- config
@dataclass
class SARConfig:
    hidden_size: int  # the target's hidden size H
    vocab_size: int  # the target's vocabulary size V (rows of its LM head)
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    k: int = 2  # tokens per block (per forward pass); 1 = EAGLE-style autoregressive head
    num_layers: int = 2
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 4096
    fusion_norm: bool = True  # RMSNorm the embedding and the feature before the Linear(2H -> H) fusion
    # every slot of a block also reads the block's newest (feature, token) pair through its own Linear(2H -> H),
    # added to its fused input: the block's first slot, which drafts the nearest token, then sees the newest pair at
    # its own position instead of through attention (k >= 2; an addition of ours, not in the paper)
    newest_pair: bool = False
    # slot i > 0 of a block reads the token drafted at slot i - 1 (:class:`SlotChain`, applied per candidate after the
    # decoder layers): the block's later tokens are conditioned on its earlier ones, as Hydra's heads are on the tokens
    # before them, at the cost of a small MLP per candidate instead of a drafter pass (k >= 2; an addition of ours)
    chain_slots: bool = False
    # every slot of a block drafts from the block's NEWEST position: the decoder runs under the plain causal mask, the
    # newest position's output o is slot 0 (o_j regresses h_{j+1}, the head's depth-1 feature), and slot i > 0 is
    # o through the chain on slot i - 1's token; still one pass per block of k tokens (needs chain_slots,
    # excludes newest_pair: an addition of ours, not in the paper, whose block's first slot sits at its OLDEST
    # position and sees the newest only through attention)
    newest_slots: bool = False
    # the paper's relaxed causal mask with a block's slots drafted from its positions in reverse: slot s from the
    # block's position k-1-s, so the first token comes from the newest position (as a head drafts it) and the later
    # ones from older positions, which see the whole block; position j drafting slot s regresses h_{j+2s+1}
    # (:func:`regress_ahead`; an addition of ours)
    reversed_slots: bool = False
    # with newest_slots, slot i > 0 also attends before the chain (:class:`ChainAttention`): a query from the newest
    # output and slot i - 1's token reads the keys and values the last decoder layer holds for the positions the
    # newest position sees, as the head's second pass does, without a second pass through the decoder (an addition of
    # ours)
    chain_attention: bool = False
    # EAGLE-3's multi-layer features: the inputs of these target decoder layers (a low, a middle and a high one),
    # side by side, are the features of the committed positions, mapped to H by ``feature_fc`` (Linear(F*H -> H)) before
    # the fusion; the drafter's own predicted features (width H) skip it, and the outputs still regress the target's
    # last layer (after its final norm). The id ``num_target_layers`` stands for that output itself, so a drafter
    # that reads it beside lower layers can grow from one without feature_layers (:meth:`with_feature_layers`).
    # None: the target's last layer is the feature, as in the paper
    feature_layers: list[int] | None = None
    num_target_layers: int = 0  # the target's decoder layers (checked on load when feature_layers is set)
    draft_vocab_size: int = 0  # 0 = draft over the full vocabulary; else the length of the stored index list
    target_model_type: str = ""  # identity of the target: config.model_type, model class, name
    target_architecture: str = ""
    target_name: str = ""

    def __post_init__(self) -> None:
        if self.k < 1 or self.num_layers < 0:
            raise ValueError(f"need k >= 1 and num_layers >= 0, got k={self.k}, num_layers={self.num_layers}")
        if self.newest_pair and self.k < 2:
            raise ValueError("newest_pair needs k >= 2: with k=1 every slot already holds its block's newest pair")
        if self.chain_slots and self.k < 2:
            raise ValueError("chain_slots needs k >= 2: with k=1 a block has no later slot to condition")
        if self.newest_slots and not self.chain_slots:
            raise ValueError("newest_slots needs chain_slots: the later slots of a block are drafted by the chain")
        if self.reversed_slots and (self.k < 2 or self.newest_slots):
            raise ValueError("reversed_slots needs k >= 2 and excludes newest_slots (two ways to choose a block's "
                             "drafting positions)")
        if self.chain_attention and not self.newest_slots:
            raise ValueError("chain_attention needs newest_slots: it attends from the block's newest position")
        if self.newest_slots and self.newest_pair:
            raise ValueError("newest_slots and newest_pair exclude each other: with newest_slots every slot already "
                             "drafts from the block's newest position")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} must lie in [0, vocab_size={self.vocab_size}]")
        if self.feature_layers is not None:
            self.feature_layers = check_feature_layers(self.feature_layers, self.num_target_layers, "feature_layers")

    def to_llama_config(self) -> LlamaConfig:
        """The stock Llama config the decoder layers and rotary embedding are built from."""
        return LlamaConfig(
            vocab_size=1, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=max(self.num_layers, 1), num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_parameters=dict(self.rope_parameters), max_position_embeddings=self.max_position_embeddings,
            attention_bias=False, attn_implementation="sdpa", bos_token_id=None, eos_token_id=None,
            pad_token_id=None,
        )

    def to_json(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, source: str = "config") -> SARConfig:
        return config_from_json(cls, data, FORMAT, "SAR drafter", source)


def config_from_json(cls, data: dict, fmt: str, what: str, source: str):
    """A drafter config dataclass ``cls`` from its config.json ``data``, which must name format ``fmt``; unknown keys
    (a newer falconspec's) are refused."""
    if data.get("format") != fmt:
        raise ValueError(f"{source} is not a falconspec {what} config (format {data.get('format')!r}, "
                         f"expected {fmt!r})")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - {"format"})
    if unknown:
        raise ValueError(f"{source} has unknown keys {unknown}: written by a newer falconspec?")
    return cls(**{key: value for key, value in data.items() if key in known})


def target_identity(target) -> dict:
    """The facts a drafter checkpoint records about its target (a :class:`~falconspec.target.TargetModel`)."""
    return {
        "hidden_size": int(target.hidden_size), "vocab_size": int(target.vocab_size),
        "target_model_type": str(target.config.model_type), "target_architecture": type(target.model).__name__,
        "target_name": str(target.name),
    }


# ----------------------------------------------------------------------------- module
class SlotChain(nn.Module):
    """o' = o + W_down SiLU(W_up [norm(o); norm(e)]): the output o of a later block slot, conditioned on the embedding
    e of the token drafted at the slot before it. ``W_down`` starts at zero, so an untrained chain changes nothing."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.output_norm, self.token_norm = nn.RMSNorm(hidden, eps=eps), nn.RMSNorm(hidden, eps=eps)
        self.up = nn.Linear(2 * hidden, hidden, bias=False)
        self.down = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, outputs: torch.Tensor, previous_embeds: torch.Tensor) -> torch.Tensor:
        """outputs [.., H] of slots i > 0, previous_embeds [.., H]: the embedding of the token at slot i - 1."""
        joint = torch.cat([self.output_norm(outputs), self.token_norm(previous_embeds.to(outputs.dtype))], dim=-1)
        return outputs + self.down(nn.functional.silu(self.up(joint)))


@dataclass
class ChainReads:
    """What the later slots' attention reads (``chain_attention``): the last decoder layer's keys and values
    [1|B, KV heads, T, D] (RoPE applied), the keys each query may read [B, 1, S, T] (bool: those its block's newest
    position sees) and the queries' positions [B, S] (the newest position's plus the slot)."""
    keys: torch.Tensor
    values: torch.Tensor
    allowed: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def from_cache(cls, cache: KVCache, sees, newest: torch.Tensor, first_slot: int, num_slots: int,
                   device) -> ChainReads:
        """The reads of slots ``first_slot`` .. ``first_slot + num_slots - 1`` of n blocks from ``cache``'s last
        layer: block r's newest position ``newest[r]`` sees the cached positions ``sees[r]`` marks (a bool row over
        the first positions; later ones are not seen), and slot i sits at position ``newest[r] + i``."""
        keys, values = cache.layer_states(-1)
        allowed = torch.zeros(len(newest), keys.shape[-2], dtype=torch.bool)
        for row, seen in enumerate(sees):
            allowed[row, : len(seen)] = seen
        positions = newest.cpu()[:, None] + first_slot + torch.arange(num_slots)[None]
        return cls(keys, values, allowed[:, None, None, :].expand(-1, 1, num_slots, -1).to(device),
                   positions.to(device))


class ChainAttention(nn.Module):
    """o + W_out Attn(q): the output o of a later block slot, before :class:`SlotChain`, with what a query made of
    [norm(o); norm(e)] (e: the embedding of the token drafted at the slot before; RoPE at the slot's own position)
    reads from the keys and values of the drafter's last decoder layer at the positions the block's newest position
    sees. ``W_out`` starts at zero, so an untrained one changes nothing."""

    def __init__(self, config: SARConfig):
        super().__init__()
        hidden, self.heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.output_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.token_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.query = nn.Linear(2 * hidden, self.heads * self.head_dim, bias=False)
        self.out = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, outputs: torch.Tensor, previous_embeds: torch.Tensor, reads: ChainReads,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """outputs, previous_embeds [B, S, H]; ``reads`` (:class:`ChainReads`); position_embeddings: (cos, sin) of
        the queries' positions."""
        B, S, _ = outputs.shape
        joint = torch.cat([self.output_norm(outputs), self.token_norm(previous_embeds.to(outputs.dtype))], dim=-1)
        q = self.query(joint).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, S, D]
        q = apply_rotary_pos_emb(q, q, *position_embeddings)[0]
        keys, values = (x.to(q.dtype).expand(B, -1, -1, -1) for x in (reads.keys, reads.values))
        read = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=reads.allowed, enable_gqa=True)
        return outputs + self.out(read.transpose(1, 2).reshape(B, S, -1))


class SARDrafterModel(nn.Module):
    """Fusion Linear(2H -> H) of [embedding(x_{j+1}), feature f_j] (plus, with ``newest_pair``, a Linear of the block's
    newest pair), then N Llama decoder layers, no final norm; with ``chain_slots``, a :class:`SlotChain` that callers
    apply to the outputs of later block slots (:meth:`chain_teacher_forced` in training, per candidate in drafting)."""

    def __init__(self, config: SARConfig, draft_vocab: Sequence[int] | torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.llama_config = config.to_llama_config()
        hidden = config.hidden_size
        norm = (lambda: nn.RMSNorm(hidden, eps=config.rms_norm_eps)) if config.fusion_norm else nn.Identity
        self.embed_norm, self.feature_norm = norm(), norm()
        self.fuse = nn.Linear(2 * hidden, hidden, bias=True)
        self.feature_fc = None
        if config.feature_layers:  # the fused target layers' inputs -> one H-wide feature; it starts by passing the
            # highest layer's input through (the nearest to the last layer a drafter without it reads), as EAGLE-3's
            # drafter here starts (eagle3_model.py)
            layers = config.feature_layers
            self.feature_fc = nn.Linear(len(layers) * hidden, hidden, bias=False)
            with torch.no_grad():
                self.feature_fc.weight.zero_()
                high = layers.index(max(layers))
                self.feature_fc.weight[:, high * hidden:(high + 1) * hidden] = torch.eye(hidden)
        self.newest = None
        if config.newest_pair:  # starts at zero: an untrained one changes nothing
            self.newest = nn.Linear(2 * hidden, hidden, bias=False)
            nn.init.zeros_(self.newest.weight)
        self.chain = SlotChain(hidden, config.rms_norm_eps) if config.chain_slots else None
        self.chain_attention = ChainAttention(config) if config.chain_attention else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(self.llama_config, i) for i in range(config.num_layers))
        # not a submodule: model.to(bfloat16) must not round the RoPE frequencies (it moves devices by itself)
        object.__setattr__(self, "rotary", LlamaRotaryEmbedding(self.llama_config))
        register_draft_vocab(self, config, draft_vocab)

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_target(cls, target, k: int = 2, num_layers: int = 2, draft_vocab: Sequence[int] | None = None,
                   **overrides) -> SARDrafterModel:
        """An untrained drafter shaped like ``target``'s layers (same width, heads, RoPE), fp32 on its device."""
        tcfg = target.config
        heads = tcfg.num_attention_heads
        config = SARConfig(
            **target_identity(target), k=k, num_layers=num_layers,
            intermediate_size=tcfg.intermediate_size, num_attention_heads=heads,
            num_key_value_heads=getattr(tcfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads,
            rms_norm_eps=float(getattr(tcfg, "rms_norm_eps", 1e-6)),
            rope_parameters=dict(getattr(tcfg, "rope_parameters", None) or {"rope_type": "default",
                                                                          "rope_theta": 10000.0}),
            max_position_embeddings=target.max_context, num_target_layers=tcfg.num_hidden_layers, **overrides,
        )
        return cls(config, draft_vocab).to(target.device)

    @classmethod
    def from_pretrained(cls, directory: str | Path, target, dtype: torch.dtype = torch.float32) -> SARDrafterModel:
        """Load a checkpoint directory for ``target``; raises :class:`DrafterMismatchError` if it does not fit."""
        return load_drafter_module(cls, SARConfig, directory, target, dtype, "drafter",
                                   ": pass the directory written by SARDrafterModel.save_pretrained (or "
                                   "`falconspec train`)")

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_drafter_files(self, directory, self.config.to_json())

    def grown(self, **parts: bool) -> SARDrafterModel:
        """This drafter with the zero-initialised parts named in ``parts`` (``newest_pair``, ``chain_slots``) added
        where asked for and absent: the same drafter until trained, so a trained one can be fine-tuned with them."""
        unknown = sorted(set(parts) - {"newest_pair", "chain_slots"})
        if unknown:
            raise ValueError(f"cannot grow a drafter by {unknown}: only newest_pair and chain_slots start at zero")
        added = {name: True for name, wanted in parts.items() if wanted and not getattr(self.config, name)}
        if not added:
            return self
        new = tuple(prefix for name, prefix in (("newest_pair", "newest."), ("chain_slots", "chain.")) if name in added)
        return self._rebuilt(dataclasses.replace(self.config, **added), new)

    def with_newest_slots(self, k: int = 2, chain_attention: bool = False) -> SARDrafterModel:
        """This k=1 head as a k-token drafter whose slots all draft from the newest position (``newest_slots``): the
        same decoder drafts slot 0 exactly as the head drafts its token, and the chain that drafts the later slots
        (with ``chain_attention``, its attention too) starts at zero (untrained), so that a trained head can be
        fine-tuned into one."""
        if self.k != 1 or self.newest is not None or self.chain is not None:
            raise ValueError(f"only a plain k=1 head becomes a newest-slots drafter, not one with k={self.k}")
        config = dataclasses.replace(self.config, k=k, chain_slots=True, newest_slots=True,
                                     chain_attention=chain_attention)
        return self._rebuilt(config, ("chain.", "chain_attention."))

    def with_feature_layers(self, feature_layers: Sequence[int], num_target_layers: int) -> SARDrafterModel:
        """This drafter, which reads the target's last layer, reading ``feature_layers`` of a ``num_target_layers``-
        layer target instead, the highest being ``num_target_layers`` (the output after the final norm, what it reads
        now): ``feature_fc`` starts as a pass-through of that block and zero on the others, so it drafts as before
        until trained and learns what the lower layers add."""
        layers = [int(i) for i in feature_layers]
        if self.feature_layers is not None:
            raise ValueError(f"the drafter already reads target layers {self.feature_layers}")
        if max(layers) != num_target_layers:
            raise ValueError(f"a drafter that reads the target's last layer grows into one reading {layers} only if "
                             f"the highest is {num_target_layers} (that output, after the final norm)")
        config = dataclasses.replace(self.config, feature_layers=layers, num_target_layers=num_target_layers)
        return self._rebuilt(config, ("feature_fc.",))

    def with_layers(self, num_layers: int) -> SARDrafterModel:
        """This drafter with decoder layers appended up to ``num_layers``, each a copy of the last one whose output
        projections (attention's ``o_proj``, the MLP's ``down_proj``) start at zero: every appended layer passes its
        input through unchanged, so the drafter drafts as before until trained, and its attention and MLP start
        from trained weights rather than random ones."""
        have = self.config.num_layers
        if have < 1:
            raise ValueError("a drafter without decoder layers has no layer to grow from")
        if num_layers < have:
            raise ValueError(f"a drafter with {have} decoder layers can only grow to more (asked for {num_layers})")
        if num_layers == have:
            return self
        model = self._rebuilt(dataclasses.replace(self.config, num_layers=num_layers),
                              tuple(f"layers.{i}." for i in range(have, num_layers)))
        last = self.layers[-1].state_dict()
        for layer in model.layers[have:]:
            layer.load_state_dict(last)
            with torch.no_grad():
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
        return model

    def _rebuilt(self, config: SARConfig, new: tuple[str, ...]) -> SARDrafterModel:
        """A drafter with ``config`` holding this one's weights; only the (zero-initialised) parameters under the
        prefixes ``new`` are its own."""
        model = type(self)(config, None if self.draft_vocab is None else self.draft_vocab.cpu())
        missing, unexpected = model.load_state_dict(self.state_dict(), strict=False)
        assert not unexpected and all(key.startswith(new) for key in missing), (missing, unexpected)
        return model.to(device=self.fuse.weight.device, dtype=self.dtype).train(self.training)

    # ---------------------------------------------------------------- forward
    @property
    def k(self) -> int:
        return self.config.k

    @property
    def dtype(self) -> torch.dtype:
        return self.fuse.weight.dtype

    def new_cache(self) -> KVCache:
        return KVCache(self.llama_config)

    def embed(self, embedding: nn.Embedding | torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Look ``ids`` [..] up in the target's embedding (module or weight [V, H]); [.., H] in the drafter's dtype."""
        return embed_tokens(embedding, ids, self.dtype)

    def forward(self, features: torch.Tensor, token_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_key_values: KVCache | None = None,
                block_offset: int | torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                chain_embeds: torch.Tensor | None = None, detach_chain: bool = False) -> torch.Tensor:
        """Predicted features o_j ≈ h_{j+k}, [B, S, H] (see the module docstring for the inputs). ``chain_embeds``
        [B, S, H], a teacher-forced pass's true input-token embeddings: later block slots come out conditioned on
        them (``chain_slots``, :meth:`chain_teacher_forced`; inside forward, so data-parallel training syncs it);
        with ``newest_slots`` every position's k slots then come out, [B, S, k, H] (:meth:`slots_teacher_forced`;
        ``detach_chain``: the later slots' gradients stop at the chain)."""
        hidden_size = self.config.hidden_size
        widths = (hidden_size,) if self.feature_fc is None else (hidden_size, self.feature_fc.in_features)
        if (features.shape[:-1] != token_embeds.shape[:-1] or token_embeds.shape[-1] != hidden_size
                or features.shape[-1] not in widths):
            raise ValueError(f"features {tuple(features.shape)} and token_embeds {tuple(token_embeds.shape)} must be "
                             f"[B, S, {' or '.join(map(str, widths))}] and [B, S, {hidden_size}]")
        dtype = self.dtype
        if attention_mask.dtype != dtype:  # re-derive rather than cast: float32's min overflows in bf16
            attention_mask = additive_mask(attention_mask == 0, dtype)
        features = features.to(dtype)
        if features.shape[-1] != hidden_size:  # the target's fused layers; the drafter's own features are H wide
            features = self.feature_fc(features)
        fused = torch.cat([self.embed_norm(token_embeds.to(dtype)), self.feature_norm(features)], dim=-1)
        hidden = self.fuse(fused)  # [B, S, H]
        if self.newest is not None:
            if block_offset is None:
                raise ValueError("this drafter reads its blocks' newest pairs (newest_pair): pass block_offset")
            last = block_last_index(fused.shape[1], self.k, block_offset, lengths, fused.device)  # [B|1, S]
            newest = fused.gather(1, last.expand(fused.shape[0], -1)[..., None].expand(-1, -1, fused.shape[-1]))
            hidden = hidden + self.newest(newest)
        position_embeddings = self.rotary(hidden, position_ids)
        if self.chain_attention is not None and chain_embeds is not None and past_key_values is None:
            past_key_values = self.new_cache()  # the later slots read the last layer's keys and values from it
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=past_key_values is not None, position_embeddings=position_embeddings,
                           **forward_kwargs(layer.forward, past_key_values))
        if chain_embeds is not None and self.config.newest_slots:
            reads = None
            if self.chain_attention is not None:
                if past_key_values.length != hidden.shape[1]:
                    raise ValueError("a teacher-forced pass of a chain_attention drafter starts with no cache")
                reads = ChainReads(*past_key_values.layer_states(len(self.layers) - 1), attention_mask == 0,
                                   position_ids)
            return self.slots_teacher_forced(hidden, chain_embeds, detach_chain, reads)
        if chain_embeds is not None:
            hidden = self.chain_teacher_forced(hidden, chain_embeds, block_offset)
        return hidden

    def slots_teacher_forced(self, outputs: torch.Tensor, token_embeds: torch.Tensor, detach: bool = False,
                             reads: ChainReads | None = None) -> torch.Tensor:
        """``newest_slots``: the k slot outputs [B, S, k, H] of every position j of a teacher-forced causal pass
        (``outputs`` [B, S, H], slot 0): slot i > 0 is slot 0 through the chain on slot i - 1's true token x_{j+i+1},
        the input token of position j + i (``token_embeds`` [B, S, H]: the true inputs; past the end: unused), as
        drafting chains a block's slots. ``detach``: the chain reads slot 0 without its gradient, so the later
        slots' losses train the chain alone and the decoder learns slot 0 as a k=1 head would. ``reads``
        (``chain_attention``): the pass's own keys, values, mask and positions; slot i of position j attends at
        position j + i to the keys position j sees."""
        num = outputs.shape[1]
        slots = [outputs]
        source = outputs.detach() if detach else outputs
        if reads is not None and detach:
            reads = dataclasses.replace(reads, keys=reads.keys.detach(), values=reads.values.detach())
        for slot in range(1, self.k):
            ahead = (torch.arange(num, device=outputs.device) + slot).clamp(max=num - 1)
            at = None if reads is None else dataclasses.replace(reads, positions=reads.positions + slot)
            slots.append(self.chained(source, token_embeds[:, ahead], at))
        return torch.stack(slots, dim=2)

    def chained(self, outputs: torch.Tensor, previous_embeds: torch.Tensor,
                reads: ChainReads | None = None) -> torch.Tensor:
        """Later slots [B, S, H] from the outputs that draft them and the embeddings of the tokens drafted at the
        slots before (``chain_slots``): through the chain's attention first when the drafter has one
        (``chain_attention``; ``reads``: what it reads, the positions being the later slots' own), then the chain."""
        if self.chain_attention is not None:
            if reads is None:
                raise ValueError("this drafter's later slots attend (chain_attention): pass what they read")
            outputs = self.chain_attention(outputs, previous_embeds, reads, self.rotary(outputs, reads.positions))
        return self.chain(outputs, previous_embeds)

    def chain_teacher_forced(self, outputs: torch.Tensor, token_embeds: torch.Tensor,
                             block_offset: int | torch.Tensor | None) -> torch.Tensor:
        """Outputs [B, S, H] of a teacher-forced pass with every later slot conditioned (``chain_slots``) on the true
        token of the slot before it: o_q ≈ h_{q+a} predicts x_{q+a+1} (a: :func:`regress_ahead`, k in the paper's
        layout), so the slot before drafts x_{q+a}, the input token of position q+a-1 (``token_embeds`` [B, S, H]:
        the true inputs). Unchanged without ``chain_slots``."""
        if self.chain is None:
            return outputs
        if block_offset is None:
            raise ValueError("chaining a teacher-forced pass's slots needs its block_offset")
        num, dev = outputs.shape[1], outputs.device
        later = drafted_slots(self.config, num, block_offset, dev) > 0  # [B|1, S]
        # o_j ≈ h_{j+a} drafts x_{j+a+1}; the slot before drafts x_{j+a}, the input token of position j+a-1
        previous = (torch.arange(num, device=dev) + regress_ahead(self.config, num, block_offset, dev) - 1)
        previous = previous.clamp(max=num - 1).expand(outputs.shape[0], -1)  # past the end: unused
        chained = self.chain(outputs, token_embeds.gather(1, previous[..., None].expand(-1, -1, outputs.shape[-1])))
        return torch.where(later[..., None], chained, outputs)

    # ---------------------------------------------------------------- the (frozen) head
    @property
    def feature_layers(self) -> list[int] | None:
        """The target layers whose inputs it reads (``SARConfig.feature_layers``); None: the target's last layer
        after the final norm (what its LM head reads)."""
        return self.config.feature_layers

    def head_input(self, outputs: torch.Tensor) -> torch.Tensor:
        """What the head reads of predicted features: the features themselves (they regress the target's)."""
        return outputs

    def head_weight(self, lm_head: nn.Module | torch.Tensor) -> torch.Tensor:
        """The rows [D, H] of the target's LM head weight [V, H] the drafter scores (D = V without a draft vocab)."""
        return draft_head_weight(lm_head, self.draft_vocab)

    def logits(self, outputs: torch.Tensor, lm_head: nn.Module | torch.Tensor) -> torch.Tensor:
        """Draft logits [.., D] of predicted features [.., H]; entry i is token ``draft_vocab[i]`` (or i)."""
        weight = self.head_weight(lm_head)
        return nn.functional.linear(outputs, weight.to(device=outputs.device, dtype=outputs.dtype))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- checks and helpers
def check_draft_vocab(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A draft vocabulary as a sorted LongTensor [D] of distinct target token ids in [0, vocab_size)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
    if ids.numel() == 0:
        raise ValueError("draft_vocab is empty: pass None to draft over the full vocabulary")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"draft_vocab ids must lie in [0, {vocab_size}), "
                         f"got min {int(ids.min())} and max {int(ids.max())}")
    unique = torch.unique(ids)  # sorted
    if unique.numel() != ids.numel():
        raise ValueError(f"draft_vocab has {ids.numel() - unique.numel()} duplicate ids")
    return unique


def register_draft_vocab(module: nn.Module, config, draft_vocab: Sequence[int] | torch.Tensor | None) -> None:
    """Give ``module`` its ``draft_vocab`` buffer [D] (the target token id of each draft-vocabulary entry) and set
    ``config.draft_vocab_size``; without ids, a placeholder of ``config.draft_vocab_size`` entries that loading a
    checkpoint fills in, or None (draft over the full vocabulary)."""
    if draft_vocab is not None:
        ids = check_draft_vocab(draft_vocab, config.vocab_size)
        config.draft_vocab_size = len(ids)
        module.register_buffer("draft_vocab", ids)
    elif config.draft_vocab_size:
        module.register_buffer("draft_vocab", torch.zeros(config.draft_vocab_size, dtype=torch.long))
    else:
        module.draft_vocab = None


def draft_head_weight(lm_head: nn.Module | torch.Tensor, draft_vocab: torch.Tensor | None) -> torch.Tensor:
    """The rows [D, H] of the target's LM head weight [V, H] a drafter scores (all V without a draft vocabulary)."""
    weight = lm_head.weight if isinstance(lm_head, nn.Module) else lm_head
    if draft_vocab is not None:
        weight = weight.index_select(0, draft_vocab.to(weight.device))
    return weight


def save_drafter_files(module: nn.Module, directory: str | Path, config_json: dict) -> Path:
    """Write ``model.safetensors`` (the module's state) and ``config.json`` (``config_json``, which names its
    ``format``) to ``directory``."""
    return save_drafter_state(module.state_dict(), directory, config_json)


def save_drafter_state(state: dict[str, torch.Tensor], directory: str | Path, config_json: dict) -> Path:
    """:func:`save_drafter_files` from a state dict (e.g. tensors computed from other drafters' files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": config_json["format"]})
    (directory / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
    return directory


def most_frequent_tokens(counts: torch.Tensor, size: int, always: Sequence[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``counts`` [V] (plus ``always``, e.g. EOS), sorted: a draft vocab."""
    if not 0 < size <= counts.numel():
        raise ValueError(f"draft vocabulary size must lie in [1, {counts.numel()}], got {size}")
    forced = torch.as_tensor(list(always), dtype=torch.long)
    scores = counts.double().clone()
    scores[forced] = float("inf")
    return torch.sort(scores.topk(size).indices).values


def load_drafter_module(cls, config_cls, directory: str | Path, target, dtype: torch.dtype, what: str,
                        hint: str = "") -> nn.Module:
    """A drafter module ``cls`` from its checkpoint directory (``config.json`` read by ``config_cls.from_json``,
    ``model.safetensors``), checked against ``target`` (:func:`check_fits`), in ``dtype`` on the target's device.
    ``what`` names the kind of checkpoint in errors, ``hint`` ends the missing-file error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} checkpoint directory {str(directory)!r} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{what} checkpoint {str(directory)!r} has no {name}{hint}")
    config = config_cls.from_json(json.loads((directory / CONFIG_FILE).read_text()), str(directory / CONFIG_FILE))
    check_fits(config, target, str(directory))
    model = cls(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return model.to(device=target.device, dtype=dtype).eval()


def check_fits(config: SARConfig, target, source: str = "the drafter") -> None:
    """Raise :class:`DrafterMismatchError` if a drafter with ``config`` cannot run on ``target``."""
    actual = target_identity(target)
    for key, what in (("hidden_size", "hidden size"), ("vocab_size", "vocabulary size"),
                      ("target_model_type", "model type"), ("target_architecture", "architecture")):
        expected = getattr(config, key)
        if expected != actual[key]:
            raise DrafterMismatchError(
                f"{source} was trained for a target with {what} {expected!r}, but target {actual['target_name']!r} "
                f"has {what} {actual[key]!r}: load a drafter trained for this target (or train one)"
            )
    fused = getattr(config, "feature_layers", None)  # an EAGLE-3 drafter reads layers by index
    if fused and config.num_target_layers != target.config.num_hidden_layers:
        raise DrafterMismatchError(f"{source} fuses layers {fused} of a {config.num_target_layers}-layer target, but "
                                   f"{actual['target_name']!r} has {target.config.num_hidden_layers} layers")
    if config.target_name and config.target_name != actual["target_name"]:
        log.warning("%s was trained for target %r, loading it for %r (same shape and architecture)",
                    source, config.target_name, actual["target_name"])

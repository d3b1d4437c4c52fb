"""The target model: a stock Hugging Face causal LM driven through its public forward arguments.

The model holds weights, tokenizer and the forwards; each forward works on the :class:`~.kv_cache.KVCache` of the
sequence it is given (a :class:`~.sequence.Sequence` owns one). Without one, the forwards use the target's own
default cache: a convenience for one-off tools and tests, never shared by generators. :meth:`TargetModel.forward_trees`
verifies several sequences' trees in one batched forward (:mod:`.batch`); every other forward is for one sequence.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .adapter import ModelAdapter, adapt, check_feature_layers, check_outputs
from .kernels import MatmulPolicy, attach_policy
from .kv_cache import BatchedKVCache, KVCache
from .tree import Tree


@dataclass(frozen=True)
class TreeOutput:
    logits: torch.Tensor  # [num_nodes, vocab]; row i predicts the token after node i
    hidden_states: torch.Tensor  # [num_nodes, hidden]; last layer after the final norm (what the LM head reads)
    features: torch.Tensor  # [num_nodes, F]: hidden_states, or the requested layers' inputs side by side


class TargetModel:
    """Prefill, verify a token tree on top of the KV cache, and compact the cache to the accepted path."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str | None = None,
                 max_context: int | None = None):
        """``max_context``: the context the engine uses (default: the model's own); a model with sliding-window
        layers needs one no longer than its window. A model the engine cannot run exactly (unknown output
        processing, a cache it cannot compact) raises :class:`~.adapter.UnsupportedModelError` (see
        :mod:`.adapter`)."""
        self.model = model.eval()
        # which product path each row count takes: stock F.linear until calibration measures otherwise (kernels.py);
        # drafters attach their own layers to the same policy
        self.matmul_policy = MatmulPolicy()
        attach_policy(model, self.matmul_policy)
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", None) or model.config.model_type
        self.config = model.config
        self.decoder = model.get_decoder()  # the transformer body; its last_hidden_state is post-final-norm
        self.lm_head = model.get_output_embeddings()
        self.adapter: ModelAdapter = adapt(model, self.name, max_context)
        check_outputs(model, lambda ids: self.logits(self.decoder(input_ids=ids, use_cache=False).last_hidden_state[0]),
                      self.name, self.vocab_size)
        self.cache = self.new_cache()  # the default cache of the cache-less calls (tools, tests)

    # ---------------------------------------------------------------- facts about the model
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def max_context(self) -> int:
        """Positions the engine may use: the model's own context, or less (see :mod:`.adapter`)."""
        return self.adapter.max_context

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
        return ids

    @property
    def cache_len(self) -> int:
        """Positions in the default cache."""
        return self.cache.length

    # ---------------------------------------------------------------- forwards
    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence of this model."""
        return KVCache(self.config, full_layers=self.adapter.windowed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] last hidden states -> [..., vocab] logits, through the model's own output processing."""
        return self.adapter.process(self.lm_head(hidden))

    def process_logits(self, head_outputs: torch.Tensor) -> torch.Tensor:
        """The model's output processing of raw LM head outputs (elementwise: any slice of the vocabulary)."""
        return self.adapter.process(head_outputs)

    def reset(self) -> None:
        """Empty the default cache."""
        self.cache.clear()

    @contextlib.contextmanager
    def layer_inputs(self, feature_layers: Sequence[int] | None):
        """Collect the inputs of decoder layers ``feature_layers`` during a forward of the decoder: yields a list that
        holds [B, S, H] per layer, in the order given, once the forward has run (nothing for None). The id one past
        the last layer (the number of decoder layers) stands for the decoder's output after its final norm, what the
        LM head reads and a drafter without ``feature_layers`` reads."""
        captured: list[torch.Tensor] = []
        if not feature_layers:
            yield captured
            return
        layers = self.decoder.layers
        # the range only: a layer named twice is captured once and handed over at each place (as before the check
        # was shared with the drafter configs, which refuse repeats)
        check_feature_layers(sorted(set(feature_layers)), len(layers), f"{self.name!r}: feature layers")
        slots: dict[int, torch.Tensor] = {}

        def hook(index):
            def keep(module, args, kwargs):
                slots[index] = args[0] if args else kwargs["hidden_states"]
            return keep

        def keep_output(module, args, output):
            slots[len(layers)] = output[0]  # last_hidden_state

        handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True)
                   for i in set(feature_layers) if i < len(layers)]
        if len(layers) in feature_layers:
            handles.append(self.decoder.register_forward_hook(keep_output))
        try:
            yield captured
            captured.extend(slots[i] for i in feature_layers)
        finally:
            for handle in handles:
                handle.remove()

    def _features(self, last_hidden: torch.Tensor, captured: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([h[0] for h in captured], dim=-1) if captured else last_hidden[0]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, feature_layers: Sequence[int] | None = None, *,
                cache: KVCache | None = None) -> torch.Tensor:
        """Start a new sequence: empty ``cache`` (default: the target's own), cache ``input_ids`` [L] and return
        their features (no logits): the hidden states [L, hidden], or with ``feature_layers`` those decoder layers'
        inputs side by side [L, hidden * layers]."""
        cache = self.cache if cache is None else cache
        cache.clear()
        if input_ids.numel() == 0:
            width = self.hidden_size * (len(feature_layers) if feature_layers else 1)
            return torch.empty(0, width, dtype=self.dtype, device=self.device)
        with self.layer_inputs(feature_layers) as captured:
            out = self.decoder(input_ids=input_ids.to(self.device)[None], use_cache=True,
                               **cache.forward_kwargs(self.decoder.forward))
        return self._features(out.last_hidden_state, captured)

    @torch.no_grad()
    def forward_tree(self, tree: Tree, feature_layers: Sequence[int] | None = None, *,
                     cache: KVCache | None = None) -> TreeOutput:
        """Run every tree node in one forward on top of ``cache`` (default: the target's own), which grows by
        ``tree.num_nodes``. ``feature_layers``: which layers' inputs ``features`` holds (see :meth:`prefill`)."""
        cache = self.cache if cache is None else cache
        prefix_len = cache.length
        if prefix_len + tree.max_depth >= self.max_context:
            raise ValueError(
                f"tree reaches position {prefix_len + tree.max_depth}, beyond the context of {self.max_context}"
            )
        # a chain is plain causal attention: let the model build its own mask
        mask = None if tree.is_chain else tree.attention_mask(prefix_len, self.dtype, self.device)
        with self.layer_inputs(feature_layers) as captured:
            out = self.decoder(
                input_ids=tree.token_tensor(self.device)[None],
                position_ids=tree.position_ids(prefix_len, self.device)[None],
                attention_mask=mask,
                use_cache=True,
                **cache.forward_kwargs(self.decoder.forward),
            )
        hidden = out.last_hidden_state[0]
        return TreeOutput(logits=self.logits(hidden), hidden_states=hidden,
                          features=self._features(out.last_hidden_state, captured))

    def forward_trees(self, trees: Sequence[Tree], caches: Sequence[KVCache],
                      feature_layers: Sequence[int] | None = None) -> list[TreeOutput]:
        """:meth:`forward_tree` for several sequences in one decoder forward: tree ``b`` on top of ``caches[b]``
        (trees of any sizes, caches of any lengths). Afterwards each cache holds its old positions plus its tree's
        nodes, exactly as after :meth:`forward_tree`, so :meth:`compact` works unchanged. One tree is
        :meth:`forward_tree` itself.

        Each sequence's tree is padded to the largest and its cache to the longest; the float mask
        [B, 1, Nmax, Lmax + Nmax] lets node row ``b`` see its own cached positions and its tree ancestors, and a
        padding node only itself. The caches are copied into one batched cache and back on every call
        (:class:`~.kv_cache.BatchedKVCache`)."""
        if len(trees) != len(caches) or not trees:
            raise ValueError(f"need one cache per tree and at least one tree, got {len(trees)} trees and "
                             f"{len(caches)} caches")
        if len(trees) == 1:
            return [self.forward_tree(trees[0], feature_layers, cache=caches[0])]
        return self._forward_batch(trees, caches, feature_layers)

    @torch.no_grad()
    def _forward_batch(self, trees: Sequence[Tree], caches: Sequence[KVCache],
                       feature_layers: Sequence[int] | None = None) -> list[TreeOutput]:
        batch = BatchedKVCache(list(caches))
        for tree, length in zip(trees, batch.lengths):
            if length + tree.max_depth >= self.max_context:
                raise ValueError(f"tree reaches position {length + tree.max_depth}, beyond the context of "
                                 f"{self.max_context}")
        width, padded = max(tree.num_nodes for tree in trees), batch.padded_length
        tokens = torch.zeros(len(trees), width, dtype=torch.long)
        positions = torch.zeros(len(trees), width, dtype=torch.long)
        allowed = torch.zeros(len(trees), width, padded + width, dtype=torch.bool)
        for row, (tree, length) in enumerate(zip(trees, batch.lengths)):
            n = tree.num_nodes
            tokens[row, :n] = tree.token_tensor()
            positions[row] = length  # padding nodes: any valid position
            positions[row, :n] = tree.position_ids(length)
            allowed[row, :n, :length] = True
            allowed[row, :n, padded:padded + n] = tree.ancestor_mask()
            allowed[row, n:, padded + n:].fill_diagonal_(True)  # a padding node sees itself only: no empty row
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        with self.layer_inputs(feature_layers) as captured:
            out = self.decoder(input_ids=tokens.to(self.device), position_ids=positions.to(self.device),
                               attention_mask=mask[:, None].to(self.device), use_cache=True,
                               **batch.forward_kwargs(self.decoder.forward))
        batch.write_back([tree.num_nodes for tree in trees])
        hidden = out.last_hidden_state  # [B, Nmax, hidden]
        features = torch.cat(captured, dim=-1) if captured else hidden
        logits = self.logits(hidden)
        return [TreeOutput(logits=logits[row, :tree.num_nodes], hidden_states=hidden[row, :tree.num_nodes],
                           features=features[row, :tree.num_nodes]) for row, tree in enumerate(trees)]

    def compact(self, path: list[int], num_nodes: int, *, cache: KVCache | None = None) -> None:
        """Keep only the cache entries of the accepted ``path`` (tree node indices) of the last tree forward."""
        (self.cache if cache is None else cache).keep(path, num_nodes)

    # ---------------------------------------------------------------- text
    @property
    def chat_roles(self) -> frozenset[str]:
        """Message roles the chat template takes: system, user and assistant, plus tool if the template names it."""
        template = str(getattr(self.tokenizer, "chat_template", None) or "")  # a dict of named templates too
        tool = re.search(r"""['"]tool['"]""", template) is not None
        return frozenset({"system", "user", "assistant"} | ({"tool"} if tool else set()))

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's string length: a text of n characters has at least n / max_token_chars tokens."""
        return max((len(token) for token in self.tokenizer.get_vocab()), default=1) or 1

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None, *,
               special_tokens_in_content: bool = False) -> list[int]:
        """Token ids of a plain-text prompt, or of chat messages through the tokenizer's own chat template.

        In chat messages, special tokens (``<|im_start|>`` ...) written in the content are text, not control tokens,
        unless ``special_tokens_in_content`` (only the template writes control tokens, as in vLLM and the OpenAI API;
        messages without special tokens encode exactly as without this rule). A plain prompt is encoded as given.
        """
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is not None:
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(f"each message needs string 'role' and 'content' fields, got {m!r}")
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError(f"model {self.name!r} has no chat template: pass a plain prompt instead")
            options = {}
            if not special_tokens_in_content and self._has_added_tokens(m["content"] for m in messages):
                if not _SANITIZES_CONTROL_TOKENS:
                    raise ValueError("message content holds special tokens, and this transformers version cannot "
                                     "encode them as text (sanitize_control_tokens needs transformers >= 5.24)")
                options["sanitize_control_tokens"] = True  # transformers encodes them as text
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False, **options)
            return list(ids)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def _has_added_tokens(self, texts) -> bool:
        """Whether any text holds an added token (the special ones, and the rest, which transformers sanitizes too
        when the template writes them)."""
        added = list(self.tokenizer.added_tokens_encoder)
        return any(token in text for text in texts for token in added)


_SANITIZES_CONTROL_TOKENS = "sanitize_control_tokens" in inspect.signature(
    PreTrainedTokenizerBase.apply_chat_template).parameters

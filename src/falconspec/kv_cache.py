"""The KV cache of one sequence: the only module that touches Hugging Face cache internals.

The target's cache and the SAR / EAGLE-3 drafters' own caches are all :class:`KVCache` objects: grown by a forward
that gets :meth:`KVCache.forward_kwargs`, measured by :attr:`KVCache.length`, cut back by :meth:`KVCache.crop_to`
and compacted to an accepted tree path by :meth:`KVCache.keep`. (Batched verification will put several sequences'
caches side by side; callers only ever see this interface.)
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def cache_keyword(forward: Callable) -> str:
    """The keyword under which a transformers ``forward`` takes its KV cache: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before (deprecated in 5.24, removed in 5.40)."""
    return _keyword(getattr(forward, "__func__", forward))  # a bound method: its class's function


@functools.lru_cache(maxsize=None)
def _keyword(function: Callable) -> str:
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


class KVCache:
    """Keys and values of the cached positions of one sequence, for every layer of one model."""

    def __init__(self, config, full_layers: bool = False) -> None:
        """``full_layers``: keep every position in every layer, also of sliding-window layers, for a model whose
        window the context never reaches (:mod:`.adapter` checks that); otherwise every layer must be a plain
        full-attention layer: other layouts (sliding, recurrent) cannot be cropped and compacted exactly."""
        self.config = config  # the model config the layers are built from
        self.full_layers = full_layers
        self.clear()
        if not full_layers:
            kinds = {type(layer).__name__ for layer in self._hf.layers if type(layer) is not DynamicLayer}
            if kinds:
                raise ValueError(f"a {getattr(config, 'model_type', '?')!r} cache holds {', '.join(sorted(kinds))} "
                                 "layers, which cannot be compacted to a tree path: check the model with "
                                 "falconspec.adapter.adapt")

    @property
    def length(self) -> int:
        """Cached positions."""
        return self._hf.get_seq_length()

    def clear(self) -> None:
        # without a config, transformers adds a plain DynamicLayer per layer as the first forward fills it
        self._hf = DynamicCache() if self.full_layers else DynamicCache(config=self.config)

    def forward_kwargs(self, forward: Callable) -> dict:
        """The keyword argument that hands this cache to a transformers ``forward`` (model, decoder, layer or
        attention module), which appends the new positions to it."""
        return {cache_keyword(forward): self._hf}

    def crop_to(self, length: int) -> None:
        """Keep the first ``length`` positions and drop the rest."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        if length == 0:
            self.clear()
        elif length < self.length:
            self._hf.crop(length - self.length)  # transformers takes the (negative) number of positions to drop

    def keep(self, path: list[int], num_new: int) -> None:
        """Of the last ``num_new`` positions (one forward's nodes), keep those at offsets ``path``, in that order,
        right after the earlier positions."""
        prefix_len = self.length - num_new
        if path == list(range(len(path))):  # a prefix of the forward's positions: dropping the tail is enough
            self.crop_to(prefix_len + len(path))
            return
        device = self._hf.layers[0].keys.device
        keep = torch.cat([torch.arange(prefix_len), prefix_len + torch.tensor(path, dtype=torch.long)]).to(device)
        for layer in self._hf.layers:
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)


def forward_kwargs(forward: Callable, cache: KVCache | None) -> dict:
    """The cache keyword argument of a transformers ``forward`` for ``cache``, or None (no cache, e.g. training)."""
    return cache.forward_kwargs(forward) if cache is not None else {cache_keyword(forward): None}

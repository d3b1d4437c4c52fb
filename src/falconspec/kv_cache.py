"""The KV cache of one sequence: the only module that touches Hugging Face cache internals.

The target's cache and the SAR / EAGLE-3 drafters' own caches are all :class:`KVCache` objects: grown by a forward
that gets :meth:`KVCache.forward_kwargs`, measured by :attr:`KVCache.length`, cut back by :meth:`KVCache.crop_to`
and compacted to an accepted tree path by :meth:`KVCache.keep`. Batched verification puts several sequences' caches
side by side in one :class:`BatchedKVCache` for one forward and writes each sequence's new positions back to its own
cache; callers only ever see these two interfaces.

Every layer is a :class:`SlabLayer`: its keys and values are views of a buffer reserved ahead and doubled when full,
so a forward writes only its new positions (transformers' ``DynamicLayer`` concatenates, copying the whole layer on
every forward: at 32 rows of 300 positions that copy was over half of a decoding step).
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


class SlabLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` and ``values`` are views of the first positions of a larger buffer.

    Appending writes into the buffer; a full buffer is replaced by one twice as large (amortised, one copy per
    doubling). ``crop`` (a shorter view) and in-place writes through the views (:meth:`KVCache.keep`) work
    unchanged; if anything replaces the views by other tensors, the next append adopts them into a new buffer."""

    MIN_CAPACITY = 64

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        capacity = self._key_buffer.shape[-2] if self._writable(key_states) else 0
        if not capacity or new > capacity:
            self._reserve(key_states, value_states, old, max(new, 2 * capacity, self.MIN_CAPACITY))
        self._key_buffer[..., old:new, :] = key_states
        self._value_buffer[..., old:new, :] = value_states
        self.keys, self.values = self._key_buffer[..., :new, :], self._value_buffer[..., :new, :]
        return self.keys, self.values

    def _writable(self, key_states: torch.Tensor) -> bool:
        """Whether new positions like ``key_states`` can be written into the buffers as they are: ``keys`` and
        ``values`` are still their leading views (same start and strides; ``_base`` is not tracked under
        ``torch.inference_mode``), the rows and heads match, and a buffer made under inference mode is not written
        outside it."""
        return self._key_buffer is not None and self._key_buffer.shape[:-2] == key_states.shape[:-2] \
            and (torch.is_inference_mode_enabled() or not self._key_buffer.is_inference()) and all(
                view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()
                for view, buffer in ((self.keys, self._key_buffer), (self.values, self._value_buffer)))

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, old: int, capacity: int) -> None:
        """A new buffer of ``capacity`` positions holding the first ``old`` cached positions."""
        buffers = []
        for states, cached in ((key_states, self.keys), (value_states, self.values)):
            buffer = states.new_empty(*states.shape[:-2], capacity, states.shape[-1])
            if old:
                buffer[..., :old, :] = cached[..., :old, :]
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class KVCache:
    """Keys and values of the cached positions of one sequence (or of a batch of rows, see :meth:`select`), for
    every layer of one model."""

    def __init__(self, config, full_layers: bool = False) -> None:
        """``full_layers``: keep every position in every layer, also of sliding-window layers, for a model whose
        window the context never reaches (:mod:`.adapter` checks that); otherwise every layer must be a plain
        full-attention layer: other layouts (sliding, recurrent) cannot be cropped and compacted exactly."""
        self.config = config  # the model config the layers are built from
        self.full_layers = full_layers
        self.clear()
        if not full_layers:
            kinds = {type(layer).__name__ for layer in self._hf.layers if type(layer) is not SlabLayer}
            if kinds:
                raise ValueError(f"a {getattr(config, 'model_type', '?')!r} cache holds {', '.join(sorted(kinds))} "
                                 "layers, which cannot be compacted to a tree path: check the model with "
                                 "falconspec.adapter.adapt")

    @property
    def length(self) -> int:
        """Cached positions."""
        return self._hf.get_seq_length()

    def clear(self) -> None:
        # without a config, transformers adds a layer per model layer as the first forward fills it
        self._hf = DynamicCache() if self.full_layers else DynamicCache(config=self.config)
        if self.full_layers:
            self._hf.layer_class_to_replicate = SlabLayer
        else:  # plain full-attention layers become slabs; any other kind is refused by __init__
            self._hf.layers = [SlabLayer() if type(layer) is DynamicLayer else layer for layer in self._hf.layers]

    def forward_kwargs(self, forward: Callable) -> dict:
        """The keyword argument that hands this cache to a transformers ``forward`` (model, decoder, layer or
        attention module), which appends the new positions to it."""
        return {cache_keyword(forward): self._hf}

    def layer_states(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values [rows, KV heads, positions, head dim] layer ``index`` holds (RoPE applied)."""
        layer = self._hf.layers[index]
        return layer.keys, layer.values

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
        # move only the accepted nodes, in place, to the front of the forward's positions; then drop the rest
        source = prefix_len + torch.tensor(path, dtype=torch.long, device=self._hf.layers[0].keys.device)
        kept = slice(prefix_len, prefix_len + len(path))
        for layer in self._hf.layers:
            layer.keys[..., kept, :] = layer.keys.index_select(-2, source)
            layer.values[..., kept, :] = layer.values.index_select(-2, source)
        self.crop_to(prefix_len + len(path))

    def select(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """For a cache of several rows (a batched forward's): keep rows ``rows`` [R], row ``r`` of the result holding
        the positions ``positions[r]`` [R, P] of row ``rows[r]``, in that order (any position where it does not
        matter, e.g. padding the caller masks out)."""
        if positions.shape[0] != rows.shape[0]:
            raise ValueError(f"need one row of positions per kept row, got {positions.shape[0]} for {rows.shape[0]}")
        for layer in self._hf.layers:
            heads, dim = layer.keys.shape[1], layer.keys.shape[-1]
            index = positions.to(layer.keys.device)[:, None, :, None].expand(-1, heads, -1, dim)
            keys = layer.keys.index_select(0, rows).gather(2, index)
            values = layer.values.index_select(0, rows).gather(2, index)
            layer.reset()
            layer.update(keys, values)

    def take_rows(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding rows ``rows`` [R] of this one, all their positions; this one is left as it is."""
        taken = KVCache(self.config, self.full_layers)
        if self.length:
            taken._hf.layers = [SlabLayer() for _ in self._hf.layers]
            for mine, theirs in zip(self._hf.layers, taken._hf.layers):
                index = rows.to(mine.keys.device)
                theirs.update(mine.keys.index_select(0, index), mine.values.index_select(0, index))
        return taken

    @classmethod
    def stack_rows(cls, caches: list["KVCache"]) -> "KVCache":
        """One cache holding the rows of ``caches`` one after the other, each padded at its end to the longest with
        positions of zeros (for the caller to mask out or drop with :meth:`select`)."""
        if not caches or any(c.length == 0 for c in caches):
            raise ValueError("stacking needs caches that all hold positions")
        longest = max(c.length for c in caches)
        stacked = KVCache(caches[0].config, caches[0].full_layers)
        stacked._hf.layers = [SlabLayer() for _ in caches[0]._hf.layers]
        for index, layer in enumerate(stacked._hf.layers):
            parts = [(c._hf.layers[index].keys, c._hf.layers[index].values) for c in caches]
            pad = [(0, 0, 0, longest - keys.shape[-2]) for keys, _ in parts]
            layer.update(torch.cat([torch.nn.functional.pad(k, p) for (k, _), p in zip(parts, pad)]),
                         torch.cat([torch.nn.functional.pad(v, p) for (_, v), p in zip(parts, pad)]))
        return stacked


class BatchedKVCache:
    """Several sequences' caches side by side for one batched forward, right-padded to the longest.

    Row ``b`` holds sequence ``b``'s ``lengths[b]`` cached positions, then padding up to ``max(lengths)``; the forward
    appends every row's new positions after that. :meth:`write_back` then gives each sequence's own cache its old
    positions plus its first ``num_new[b]`` new ones, so that the sequence's cache looks exactly as after a forward
    of its own (it appends them: the sequence's cache is only read while stacking). The caches are copied into the
    batch on every forward (simple and exact; a shared paged cache would avoid the copies).
    """

    def __init__(self, caches: list[KVCache]) -> None:
        if not caches:
            raise ValueError("a batched cache needs at least one cache")
        self.caches = list(caches)
        self.lengths = [cache.length for cache in caches]
        self.padded_length = max(self.lengths)
        first = caches[0]
        self._hf = KVCache(first.config, first.full_layers)._hf
        if self.padded_length == 0:
            return  # nothing cached yet: the forward fills the layers
        filled = next(cache for cache in caches if cache.length)
        for index, template in enumerate(filled._hf.layers):
            keys, values = [], []
            for cache, length in zip(caches, self.lengths):
                for rows, source in ((keys, "keys"), (values, "values")):
                    like = getattr(template, source)
                    part = getattr(cache._hf.layers[index], source)[..., :length, :] if length else like[..., :0, :]
                    pad = like.new_zeros(*like.shape[:-2], self.padded_length - length, like.shape[-1])
                    rows.append(torch.cat([part, pad], dim=-2))
            self._hf.update(torch.cat(keys), torch.cat(values), index)

    def forward_kwargs(self, forward: Callable) -> dict:
        """The keyword argument that hands the batched cache to a transformers ``forward`` (see
        :meth:`KVCache.forward_kwargs`)."""
        return {cache_keyword(forward): self._hf}

    def write_back(self, num_new: list[int]) -> None:
        """After the forward: cache ``b`` becomes its old positions plus the first ``num_new[b]`` new positions of
        row ``b`` (the rest of the row is padding)."""
        start = self.padded_length
        for row, (cache, new) in enumerate(zip(self.caches, num_new)):
            for index, layer in enumerate(self._hf.layers):  # the cache still holds its old positions: append
                cache._hf.update(layer.keys[row:row + 1, ..., start:start + new, :],
                                 layer.values[row:row + 1, ..., start:start + new, :], index)


def forward_kwargs(forward: Callable, cache: KVCache | None) -> dict:
    """The cache keyword argument of a transformers ``forward`` for ``cache``, or None (no cache, e.g. training)."""
    return cache.forward_kwargs(forward) if cache is not None else {cache_keyword(forward): None}

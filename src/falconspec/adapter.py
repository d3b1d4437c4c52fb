"""What the engine needs to know about a model architecture to stay exact, or a clear refusal.

The engine runs the transformer body (``model.get_decoder()``) and the LM head itself, and keeps one KV cache per
sequence that it grows, crops and compacts to an accepted tree path (:mod:`.kv_cache`). Two things differ between
architectures and would silently change the distribution the engine samples from:

* **output processing**: what the model's own ``forward`` does to ``lm_head(hidden)`` (transformers 5.24):

  ==========================  ===========================================  =====================================
  model types                 config attribute                             operation
  ==========================  ===========================================  =====================================
  gemma2, gemma3(_text),      ``final_logit_softcapping`` (None = off)     ``tanh(x / cap) * cap``
  vaultgemma, nanochat, beam  (beam computes it in float32)
  cohere, cohere2(_moe),      ``logit_scale``                              ``x * scale``
  cohere_compass
  granite, granitemoe,        ``logits_scaling``                           ``x / scaling``
  granitemoeshared, ...swa
  hyperclovax                 ``logits_scaling``                           ``x * scaling`` (the same name!)
  ==========================  ===========================================  =====================================

  The same attribute name means different things in different models, so the table is keyed on ``model_type``. A
  config attribute that looks like output processing (its name holds ``logit``, or it is ``output_multiplier``) on
  a model type the table does not cover, with a value that changes the logits, is refused. At load, the engine's
  logits (body + head + processing) are compared with the model's own ``forward`` on a few tokens, so a model
  whose processing lives in code (a learned scale, a custom head) is refused rather than run inexactly.

* **cache layout**: the engine's cache keeps every position of every layer. Sliding-window and chunked layers
  (``sliding_window``, ``use_sliding_window``, ``layer_types``, ``attention_chunk_size``) are exact only while no
  window slides: when the window is at least the context the engine uses, they attend to every earlier position,
  like full attention. The context is then capped at the window: pass ``max_context`` (at most the window) to use a
  model whose window is shorter than its own context. Any other layout (recurrent or linear-attention state, layers
  that share another layer's cache, a quantized cache) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch


class UnsupportedModelError(ValueError):
    """The engine cannot run this model exactly; the message names the model, the feature and what to do."""


@dataclass(frozen=True)
class _Op:
    attribute: str  # config attribute holding the constant (None = the op is off)
    kind: str  # "softcap", "multiply" or "divide"
    float32: bool = False  # the model casts the logits to float32 first

    def apply(self, logits: torch.Tensor, value: float) -> torch.Tensor:
        if self.float32:
            logits = logits.float()
        if self.kind == "softcap":
            return torch.tanh(logits / value) * value
        if self.kind == "multiply":
            return logits * value
        return logits / value


_SOFTCAP = (_Op("final_logit_softcapping", "softcap"),)
_SCALE = (_Op("logit_scale", "multiply"),)
_DIVIDE = (_Op("logits_scaling", "divide"),)
# model_type -> the ops its ForCausalLM.forward applies to lm_head(hidden), in order (transformers 5.24)
OUTPUT_PROCESSING: dict[str, tuple[_Op, ...]] = {
    **dict.fromkeys(("gemma2", "gemma3", "gemma3_text", "vaultgemma", "nanochat"), _SOFTCAP),
    "beam": (_Op("final_logit_softcapping", "softcap", float32=True),),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass"), _SCALE),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granite_swa", "granitemoe_swa"), _DIVIDE),
    "hyperclovax": (_Op("logits_scaling", "multiply"),),
}
# attributes whose names look like output processing but act elsewhere (inside attention, the MoE router) or are
# flags; the model's body applies them, so the engine gets them for free
_NOT_OUTPUT = re.compile(r"attn|attention|router|num_logits_to_keep|logits_to_keep|_init_value$|output_auxiliary_logits")
_LOOKS_LIKE_OUTPUT = re.compile(r"logit|output_multiplier")
# values that leave the logits as they are
_NEUTRAL = (False, 0, 1)  # 0.0 and 1.0 compare equal

FULL_LAYERS = {"full_attention"}
WINDOWED_LAYERS = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}


@dataclass(frozen=True)
class ModelAdapter:
    """Output processing and context of one target model (see the module docstring); build it with :func:`adapt`."""

    name: str
    ops: tuple[tuple[_Op, float], ...]  # (op, its constant), in order
    max_context: int
    windowed: bool  # the config has sliding/chunked layers (whose window the context never reaches)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own output processing of raw head outputs ``lm_head(hidden)`` [..., vocab]; elementwise,
        so it applies to a slice of the vocabulary too (drafters' reduced heads)."""
        for op, value in self.ops:
            logits = op.apply(logits, value)
        return logits

    def describe(self) -> str:
        ops = ", ".join(f"{op.kind} by {op.attribute}={value}" for op, value in self.ops) or "none"
        return f"output processing: {ops}; context {self.max_context}"


def check_feature_layers(layers, num_layers: int, what: str = "feature layers") -> list[int]:
    """Target layer ids a drafter reads as features, as ints, or a ValueError that says the valid range: id i is
    the input of decoder layer i, id ``num_layers`` the decoder's output after its final norm (what the LM head and
    a drafter reading only the last layer read). At least one id, no repeats."""
    ids = [int(i) for i in layers]
    bad = [i for i in ids if not 0 <= i <= num_layers]
    if not ids or bad or len(set(ids)) != len(ids):
        raise ValueError(f"{what} {list(layers)}: need distinct target layer ids in [0, {num_layers}] (the target has "
                         f"{num_layers} decoder layers, ids 0-{num_layers - 1} their inputs; {num_layers}: their "
                         "output after the final norm)")
    return ids


def adapt(model, name: str, max_context: int | None = None) -> ModelAdapter:
    """Check that the engine can run ``model`` exactly and say how; :class:`UnsupportedModelError` if it cannot.

    ``max_context``: the context the engine may use (default: the model's ``max_position_embeddings``, or 2048);
    required, and at most the window, for a model with sliding-window layers whose window is shorter than that.
    """
    config = model.config.get_text_config(decoder=True)
    ops = _output_ops(config, name)
    own_context = int(getattr(config, "max_position_embeddings", 0) or 2048)
    if max_context is not None:
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
            raise ValueError(f"max_context must be an integer >= 2, got {max_context!r}")
        if max_context > own_context:
            raise ValueError(f"max_context {max_context} is beyond {name!r}'s own context of {own_context}")
    context = own_context if max_context is None else max_context
    windowed = _check_layout(model, config, name, context, max_context is not None)
    return ModelAdapter(name, ops, context, windowed)


def _output_ops(config, name: str) -> tuple[tuple[_Op, float], ...]:
    model_type = getattr(config, "model_type", None)
    known = OUTPUT_PROCESSING.get(model_type, ())
    handled = {op.attribute for op in known}
    for attribute, value in sorted(vars(config).items()):
        if attribute.startswith("_") or attribute in handled or not _LOOKS_LIKE_OUTPUT.search(attribute) \
                or _NOT_OUTPUT.search(attribute):
            continue
        if value is None or (isinstance(value, (bool, int, float)) and value in _NEUTRAL):
            continue
        raise UnsupportedModelError(
            f"model {name!r} (model_type {model_type!r}) has config attribute {attribute}={value!r}, which looks "
            "like processing of the output logits that falconspec does not know for this architecture; sampling "
            "without it would not follow the model's distribution. Known: "
            + "; ".join(sorted({f"{op.attribute} ({op.kind})" for ops in OUTPUT_PROCESSING.values() for op in ops}))
        )
    ops = []
    for op in known:
        value = getattr(config, op.attribute, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UnsupportedModelError(f"model {name!r}: {op.attribute}={value!r} must be a positive number")
        ops.append((op, float(value)))
    return tuple(ops)


def _check_layout(model, config, name: str, context: int, context_given: bool) -> bool:
    """Refuse a cache layout the engine cannot keep exactly; True if windowed layers are used (never sliding)."""
    if getattr(model, "_is_stateful", False):
        raise UnsupportedModelError(
            f"model {name!r} ({type(model).__name__}) keeps a recurrent state, which falconspec cannot roll back to "
            "an accepted tree path: use a transformer with a KV cache")
    generation = getattr(model, "generation_config", None)
    implementation = getattr(generation, "cache_implementation", None)
    if implementation in ("quantized", "paged"):
        raise UnsupportedModelError(
            f"model {name!r} asks for a {implementation!r} KV cache, which changes its outputs or layout; falconspec "
            "keeps a full-precision dynamic cache: clear generation_config.cache_implementation to use it")
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None) is None:
        raise UnsupportedModelError(f"model {name!r} sets use_sliding_window without a sliding_window size")
    other = sorted(set(layer_types) - FULL_LAYERS - set(WINDOWED_LAYERS))
    if other:
        raise UnsupportedModelError(
            f"model {name!r} has {', '.join(map(repr, other))} layers (layer_types); falconspec keeps every position "
            "of full or sliding-window attention layers only, and cannot compact this cache to an accepted tree "
            "path: use a model whose layers are all attention layers")
    windows = {kwargs["sliding_window"] for t, kwargs in zip(layer_types, layer_kwargs) if t in WINDOWED_LAYERS}
    if None in windows:
        raise UnsupportedModelError(f"model {name!r} has sliding-window layers without a window size")
    if not windows and implementation in ("sliding_window", "hybrid", "hybrid_chunked"):
        raise UnsupportedModelError(
            f"model {name!r} asks for a {implementation!r} cache but its config names no sliding-window layers: "
            "falconspec cannot tell which layers slide")
    if windows and min(windows) < context:
        window = min(windows)
        kinds = ", ".join(sorted({t for t in layer_types if t in WINDOWED_LAYERS}))
        how = (f"max_context={context} is beyond it" if context_given
               else f"its context is {context} tokens")
        raise UnsupportedModelError(
            f"model {name!r} has {kinds} layers with a window of {window} tokens and {how}: falconspec keeps every "
            "position in its cache and cannot reproduce attention once the window slides. Pass max_context <= "
            f"{window} (e.g. TargetModel(model, tokenizer, max_context={window})) to use it exactly within its window")
    return bool(windows)


def check_outputs(model, logits_of: Callable[[torch.Tensor], torch.Tensor], name: str, vocab_size: int) -> None:
    """Compare the engine's logits (``logits_of(input_ids [1, S]) -> [S, vocab]``) with the model's own forward on a
    few tokens; :class:`UnsupportedModelError` if they differ (output processing the adapter does not know)."""
    ids = torch.arange(1, 1 + min(6, vocab_size - 1), device=model.device)[None] % vocab_size
    with torch.no_grad():
        own = model(input_ids=ids, use_cache=False).logits[0].float()
        ours = logits_of(ids).float()
    scale = max(1.0, float(own.abs().max()))
    tolerance = (1e-4 if model.dtype == torch.float32 else 2e-2) * scale
    if own.shape != ours.shape or not torch.allclose(own, ours, rtol=0, atol=tolerance):
        diff = float((own - ours).abs().max()) if own.shape == ours.shape else float("nan")
        raise UnsupportedModelError(
            f"model {name!r} ({type(model).__name__}): the logits falconspec computes (decoder, LM head and known "
            f"output processing) differ from the model's own forward (max difference {diff:.3g}); it processes its "
            "output in a way falconspec does not know, so sampling would not follow its distribution")

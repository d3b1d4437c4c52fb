"""Export a k=1 EAGLE-3 drafter (``format: falconspec-eagle3``) for other engines.

* :func:`export_eagle3` writes a Hugging Face style directory that vLLM (``method: eagle3``) and SGLang
  (``--speculative-algorithm EAGLE3``) load by path: ``config.json`` (a one-layer ``LlamaForCausalLMEagle3``) and
  ``model.safetensors`` with EAGLE-3's tensor names.
* :func:`export_gguf` writes the GGUF llama.cpp's ``draft-eagle3`` speculative type loads (architecture ``eagle3``),
  laid out as llama.cpp's ``convert_hf_to_gguf.py --target-model-dir`` lays out such a drafter.

The drafter checkpoint (written by ``Eagle3DrafterModel.save_pretrained``) is a directory with ``config.json``
(``format``, sizes, ``rope_parameters``, ``feature_layers`` and the target's identity) and ``model.safetensors``
holding exactly::

    fc.weight [H, 3H]                                 fuses the three target features, concatenated in
                                                      feature_layers order
    midlayer.input_layernorm.weight [H]               RMSNorm of the token embedding
    midlayer.hidden_norm.weight [H]                   RMSNorm of the fused feature
    midlayer.self_attn.{q,k,v}_proj.weight [*, 2H]    attention over [norm(embed); norm(fused)]
    midlayer.self_attn.o_proj.weight [H, heads*hd]
    midlayer.post_attention_layernorm.weight [H]
    midlayer.mlp.{gate,up}_proj.weight [I, H], midlayer.mlp.down_proj.weight [H, I]
    norm.weight [H]                                   final RMSNorm before the head
    lm_head.weight [D, H]                             head over the draft vocabulary
    d2t [D] int64                                     target id = draft id + d2t[draft id]
    t2d [V] bool                                      target ids in the draft vocabulary

No token embedding: every engine shares the target's. ``feature_layers`` are target layer indices whose INPUT
hidden states are fused (Hugging Face ``output_hidden_states[i]``), the convention of vLLM's
``eagle_aux_hidden_state_layer_ids`` and of llama.cpp's ``eagle3.target_layers``; SGLang counts layer OUTPUTS
(``eagle_config.eagle_aux_hidden_state_layer_ids``, one less). Both engines concatenate the captured states in
increasing layer order, so the export sorts ``feature_layers`` and permutes ``fc``'s column blocks to match.
See ``docs/export.md`` for the commands that serve the results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT = "falconspec-eagle3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = "LlamaForCausalLMEagle3"  # the name vLLM's registry, SGLang's EntryClass and convert_hf_to_gguf share
GGUF_ARCH = "eagle3"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIDLAYER = "midlayer."

# drafter config keys this module reads (the checkpoint may carry more)
_REQUIRED_KEYS = ("hidden_size", "vocab_size", "draft_vocab_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                  "feature_layers", "num_target_layers")


# ----------------------------------------------------------------------------- the drafter checkpoint
@dataclasses.dataclass
class Eagle3Checkpoint:
    """A validated EAGLE-3 drafter checkpoint: its config.json and its tensors (CPU)."""

    directory: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def draft_vocab_size(self) -> int:
        return int(self.config["draft_vocab_size"])

    @property
    def feature_layers(self) -> list[int]:
        return [int(i) for i in self.config["feature_layers"]]

    @property
    def num_target_layers(self) -> int:
        return int(self.config["num_target_layers"])

    @property
    def rope_parameters(self) -> dict:
        return dict(self.config["rope_parameters"])

    def sorted_features(self) -> tuple[list[int], torch.Tensor]:
        """``feature_layers`` in increasing order and ``fc.weight`` with its three [H, H] column blocks permuted to
        that order (the order in which vLLM and SGLang concatenate the captured hidden states)."""
        layers = self.feature_layers
        order = sorted(range(len(layers)), key=layers.__getitem__)
        fc = self.tensors["fc.weight"]
        blocks = fc.split(fc.shape[1] // len(layers), dim=1)
        return [layers[i] for i in order], torch.cat([blocks[i] for i in order], dim=1).contiguous()


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of an EAGLE-3 drafter checkpoint with ``config``."""
    h, i = int(config["hidden_size"]), int(config["intermediate_size"])
    heads, kv, hd = int(config["num_attention_heads"]), int(config["num_key_value_heads"]), int(config["head_dim"])
    d, v = int(config["draft_vocab_size"]), int(config["vocab_size"])
    return {
        "fc.weight": (h, 3 * h),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (heads * hd, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv * hd, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, heads * hd),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.mlp.gate_proj.weight": (i, h),
        "midlayer.mlp.up_proj.weight": (i, h),
        "midlayer.mlp.down_proj.weight": (h, i),
        "norm.weight": (h,),
        "lm_head.weight": (d, h),
        "d2t": (d,),
        "t2d": (v,),
    }


def load_eagle3_checkpoint(drafter_dir: str | Path) -> Eagle3Checkpoint:
    """Read and check an EAGLE-3 drafter checkpoint directory; a clear error for anything else."""
    directory = Path(drafter_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"drafter checkpoint directory {str(directory)!r} does not exist")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no {CONFIG_FILE}: pass an EAGLE-3 drafter checkpoint "
                                "directory (written by Eagle3DrafterModel.save_pretrained)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not JSON: {err}") from err
    kind = config.get("format") if isinstance(config, dict) else None
    if kind != FORMAT:
        hint = {
            "falconspec-sar": f" It is a Falcon SAR drafter (k={config.get('k')}): a fusion layer and Llama layers "
                              "over the target's last hidden state, not EAGLE-3's layout, and no engine runs k>1 "
                              "semi-autoregressive drafting (see docs/export.md).",
            "falconspec-medusa": " Medusa heads have no EAGLE-3 layout.",
        }.get(kind, "")
        raise ValueError(f"{config_path} has format {kind!r}, not {FORMAT!r}: not an EAGLE-3 drafter checkpoint."
                         + hint)
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"{config_path} lacks {', '.join(missing)}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no {WEIGHTS_FILE}")
    tensors = load_file(str(weights))
    ckpt = Eagle3Checkpoint(directory, config, tensors)
    _check_checkpoint(ckpt)
    return ckpt


def _check_checkpoint(ckpt: Eagle3Checkpoint) -> None:
    source = str(ckpt.directory)
    config, tensors = ckpt.config, ckpt.tensors
    h, v, d = ckpt.hidden_size, ckpt.vocab_size, ckpt.draft_vocab_size
    if not 0 < d <= v:
        raise ValueError(f"{source}: draft_vocab_size {d} must lie in [1, vocab_size={v}]")
    if int(config["num_attention_heads"]) * int(config["head_dim"]) <= 0 or h <= 0:
        raise ValueError(f"{source}: hidden_size, num_attention_heads and head_dim must be positive")
    shapes = expected_shapes(config)
    derive_t2d = "t2d" not in tensors  # no engine reads t2d and d2t determines it: tolerate its absence
    unknown = sorted(set(tensors) - set(shapes))
    absent = sorted(set(shapes) - set(tensors) - ({"t2d"} if derive_t2d else set()))
    if unknown or absent:
        raise ValueError(f"{source}: tensors differ from the EAGLE-3 layout"
                         + (f"; missing {', '.join(absent)}" if absent else "")
                         + (f"; unexpected {', '.join(unknown)}" if unknown else ""))
    for name, shape in shapes.items():
        if name not in tensors:  # t2d, derived below
            continue
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        if name not in ("d2t", "t2d") and not tensors[name].is_floating_point():
            raise ValueError(f"{source}: {name} must be a floating-point tensor, got {tensors[name].dtype}")
    if tensors["d2t"].dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{source}: d2t must be int64, got {tensors['d2t'].dtype}")
    tensors["d2t"] = tensors["d2t"].long()
    target_ids = draft_to_target_ids(tensors["d2t"])
    if int(target_ids.min()) < 0 or int(target_ids.max()) >= v:
        raise ValueError(f"{source}: d2t maps draft ids outside the target vocabulary [0, {v})")
    if torch.unique(target_ids).numel() != d:
        raise ValueError(f"{source}: d2t maps two draft ids to the same target id")
    if derive_t2d:
        tensors["t2d"] = torch.zeros(v, dtype=torch.bool).index_fill_(0, target_ids, True)
    tensors["t2d"] = tensors["t2d"].bool()
    if int(tensors["t2d"].sum()) != d or not bool(tensors["t2d"][target_ids].all()):
        raise ValueError(f"{source}: t2d does not mark exactly the target ids d2t maps to")
    layers, num_layers = config["feature_layers"], ckpt.num_target_layers
    if (not isinstance(layers, list) or len(layers) != 3 or not all(isinstance(i, int) for i in layers)
            or len(set(layers)) != 3 or not all(0 <= i < num_layers for i in layers)):
        raise ValueError(f"{source}: feature_layers must be 3 distinct target layer ids in [0, num_target_layers="
                         f"{num_layers}), got {layers!r}")


def draft_to_target_ids(d2t: torch.Tensor) -> torch.Tensor:
    """Absolute target token ids [D] of the draft vocabulary from EAGLE-3's offsets (target = draft + d2t[draft])."""
    return d2t.long() + torch.arange(d2t.numel(), dtype=torch.long)


# ----------------------------------------------------------------------------- the target
@dataclasses.dataclass(frozen=True)
class TargetFacts:
    """What the export checks a drafter against: the target's hidden size, layer count and vocabulary size."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    source: str
    model_type: str = ""


def target_facts(target: Any) -> TargetFacts:
    """Sizes of ``target``: a TargetModel, a transformers model or config, a model directory or hub id, or a GGUF
    file."""
    if isinstance(target, (str, Path)):
        path = Path(target)
        if path.suffix == ".gguf" or path.is_file():
            return _gguf_target_facts(path)
        if path.is_dir():
            config_path = path / CONFIG_FILE
            if not config_path.is_file():
                raise FileNotFoundError(f"target directory {str(path)!r} has no {CONFIG_FILE}")
            data = json.loads(config_path.read_text())
            data = {**data, **data.get("text_config", {})}
            return TargetFacts(int(data["hidden_size"]), int(data["num_hidden_layers"]), int(data["vocab_size"]),
                               str(path), data.get("model_type", ""))
        from transformers import AutoConfig  # a hub id

        target = AutoConfig.from_pretrained(str(target))
    config = getattr(target, "config", target)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(target, "vocab_size", None) if config is not target else None  # a TargetModel: its head's rows
    name = getattr(target, "name", None) or getattr(text, "_name_or_path", "") or "target"
    return TargetFacts(int(text.hidden_size), int(text.num_hidden_layers), int(vocab or text.vocab_size), str(name),
                       getattr(text, "model_type", ""))


def _gguf_target_facts(path: Path) -> TargetFacts:
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"target GGUF {str(path)!r} does not exist")
    fields = GGUFReader(str(path)).fields
    arch = _field(fields, "general.architecture", path)
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"target GGUF {str(path)!r} has no tokenizer (tokenizer.ggml.tokens)")
    return TargetFacts(int(_field(fields, f"{arch}.embedding_length", path)),
                       int(_field(fields, f"{arch}.block_count", path)), len(tokens.data), str(path), arch)


def _field(fields, key: str, path: Path):
    if key not in fields:
        raise ValueError(f"GGUF {str(path)!r} has no {key}")
    return fields[key].contents()


def check_target(ckpt: Eagle3Checkpoint, facts: TargetFacts) -> None:
    """Raise unless the drafter was built for a target of ``facts``' sizes."""
    problems = []
    if facts.hidden_size != ckpt.hidden_size:
        problems.append(f"hidden size {facts.hidden_size} (drafter: {ckpt.hidden_size})")
    if facts.num_layers != ckpt.num_target_layers:
        problems.append(f"{facts.num_layers} layers (drafter: num_target_layers={ckpt.num_target_layers})")
    if facts.vocab_size != ckpt.vocab_size:
        problems.append(f"vocabulary of {facts.vocab_size} (drafter: vocab_size={ckpt.vocab_size})")
    if problems:
        raise ValueError(f"drafter {str(ckpt.directory)!r} does not fit target {facts.source!r}: the target has "
                         + "; ".join(problems))


# ----------------------------------------------------------------------------- vLLM / SGLang
def eagle3_hf_config(ckpt: Eagle3Checkpoint, dtype: str = "bfloat16") -> dict:
    """The config.json of the Hugging Face style export (see :func:`export_eagle3`)."""
    cfg = ckpt.config
    layers, _ = ckpt.sorted_features()
    rope = ckpt.rope_parameters
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    legacy_scaling = None if rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": ckpt.hidden_size,
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "num_key_value_heads": int(cfg["num_key_value_heads"]),
        "head_dim": int(cfg["head_dim"]),
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": float(cfg["rms_norm_eps"]),
        "max_position_embeddings": int(cfg["max_position_embeddings"]),
        "vocab_size": ckpt.vocab_size,  # the target's: the engines scatter draft logits into it through d2t
        "draft_vocab_size": ckpt.draft_vocab_size,
        "target_hidden_size": ckpt.hidden_size,  # fc reads 3 x this; == hidden_size, so SGLang shares the embedding
        "tie_word_embeddings": False,  # SGLang would otherwise use the target embedding as the head
        "attention_bias": False,
        "mlp_bias": False,
        "norm_before_residual": False,  # the residual is the un-normed fused feature
        "rope_theta": float(rope.get("rope_theta", 10000.0)),  # older transformers read these two ...
        "rope_scaling": legacy_scaling,
        "rope_parameters": rope,  # ... transformers 5 this one
        "torch_dtype": dtype,
        "use_cache": True,
        # vLLM: captures the INPUT of target layer i (Hugging Face hidden_states[i]); read from the top level
        "eagle_aux_hidden_state_layer_ids": layers,
        # SGLang: reads eagle_config and captures the input of layer i+1, i.e. the output of layer i
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in layers], "use_aux_hidden_state": True},
        "falconspec": {
            "format": FORMAT,
            "feature_layers": ckpt.feature_layers,
            "target_name": cfg.get("target_name", ""),
            "target_model_type": cfg.get("target_model_type", ""),
            "target_architecture": cfg.get("target_architecture", ""),
            "num_target_layers": ckpt.num_target_layers,
        },
    }


def export_eagle3(drafter_dir: str | Path, out_dir: str | Path, target: Any = None,
                  dtype: str = "bfloat16") -> Path:
    """Write the EAGLE-3 drafter at ``drafter_dir`` as a directory vLLM and SGLang load by path.

    ``config.json`` is a one-layer ``LlamaForCausalLMEagle3`` config with the target's vocabulary size,
    ``draft_vocab_size`` and the feature layers in both engines' conventions; ``model.safetensors`` holds the
    checkpoint's tensors under the same names (``midlayer.*``, ``fc``, ``norm``, ``lm_head``, ``d2t``, ``t2d``), the
    floating-point ones in ``dtype``. No embedding: vLLM and SGLang share the target's when the checkpoint has none.
    ``target`` (optional: a TargetModel, a config, a model directory, a hub id or a GGUF) is checked to match.
    """
    ckpt = load_eagle3_checkpoint(drafter_dir)
    if target is not None:
        check_target(ckpt, target_facts(target))
    torch_dtype = _torch_dtype(dtype)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    stray = sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin") and p.name != WEIGHTS_FILE)
    if stray:  # vLLM would load them too
        raise FileExistsError(f"{str(out)!r} already holds weight files {', '.join(stray)}: pick an empty directory")
    _, fc = ckpt.sorted_features()
    state = {}
    for name, tensor in ckpt.tensors.items():
        tensor = fc if name == "fc.weight" else tensor
        state[name] = (tensor.to(torch_dtype) if tensor.is_floating_point() else tensor).contiguous()
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(eagle3_hf_config(ckpt, dtype), indent=2) + "\n")
    log.info("wrote the EAGLE-3 export of %s to %s", ckpt.directory, out)
    return out


# ----------------------------------------------------------------------------- llama.cpp
# tensor names of llama.cpp's eagle3 architecture (src/models/eagle3.cpp, conversion/llama.py)
GGUF_TENSOR_NAMES = {
    "fc.weight": "fc.weight",
    "midlayer.input_layernorm.weight": "blk.0.attn_norm.weight",
    "midlayer.hidden_norm.weight": "blk.0.attn_norm_2.weight",
    "midlayer.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "midlayer.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "midlayer.self_attn.v_proj.weight": "blk.0.attn_v.weight",
    "midlayer.self_attn.o_proj.weight": "blk.0.attn_output.weight",
    "midlayer.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    "midlayer.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "midlayer.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "midlayer.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "d2t": "d2t",  # absolute target ids, I64 (the converter adds arange to EAGLE-3's offsets)
}
# file types (general.file_type) of the dtypes the export writes, as llama.cpp's LLAMA_FTYPE values
_GGUF_FILE_TYPES = {"float32": 0, "float16": 1, "bfloat16": 32}


def rope_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection [heads*hd, in] from Hugging Face's rotate-half RoPE layout (each head's
    first and second halves pair up) to GGML's interleaved one (adjacent rows pair up)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape).contiguous())


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` for Llama-3 RoPE scaling: the factor [head_dim/2] each base frequency is divided
    by, i.e. plain inverse frequencies over the scaled ones (transformers computes both)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = float(rope["rope_theta"])
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim, rope_parameters=dict(rope),
                         max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)) * 2)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return (base / scaled.double()).float()


def export_gguf(drafter_dir: str | Path, out_path: str | Path, target_gguf_or_dir: str | Path,
                dtype: str = "float16") -> Path:
    """Write the EAGLE-3 drafter at ``drafter_dir`` as a llama.cpp GGUF (architecture ``eagle3``).

    ``target_gguf_or_dir``: the target's GGUF (preferred: its ``tokenizer.*`` fields are copied verbatim, so the two
    vocabularies match exactly) or its Hugging Face directory (the vocabulary is rebuilt from its tokenizer files;
    byte-level BPE and SentencePiece only). The drafter's 2-D weights are written in ``dtype`` (float16, bfloat16
    or float32), norms in float32, ``d2t`` as absolute target ids in int64; q/k rows are permuted to GGML's RoPE
    layout. Metadata: the usual llama hyper-parameters under ``eagle3.*`` plus ``eagle3.target_layers`` (the target
    layers whose inputs are fused, also written as ``eagle3.extract_layers`` for older builds),
    ``eagle3.target_hidden_size`` and ``eagle3.norm_before_residual``. Returns the file written.
    """
    import gguf

    ckpt = load_eagle3_checkpoint(drafter_dir)
    if dtype not in _GGUF_FILE_TYPES:
        raise ValueError(f"unknown dtype {dtype!r} for GGUF: choose one of {', '.join(_GGUF_FILE_TYPES)}")
    target = Path(target_gguf_or_dir)
    facts = target_facts(target)
    check_target(ckpt, facts)
    out = Path(out_path)
    if out.is_dir():
        out = out / f"{Path(str(ckpt.config.get('target_name') or 'drafter')).name}-eagle3-{dtype}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)

    cfg = ckpt.config
    heads, kv_heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"]), int(cfg["head_dim"])
    layers, fc = ckpt.sorted_features()
    rope = ckpt.rope_parameters
    rope_type = rope.get("rope_type", rope.get("type", "default"))

    writer = gguf.GGUFWriter(str(out), GGUF_ARCH)
    writer.add_name(f"falconspec EAGLE-3 drafter for {cfg.get('target_name') or facts.source}")
    writer.add_type("model")
    writer.add_block_count(1)
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(ckpt.hidden_size)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", "llama3"):
        raise ValueError(f"RoPE type {rope_type!r} has no GGUF export yet (default, linear and llama3 do)")
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(ckpt.vocab_size)
    writer.add_file_type(_GGUF_FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_array(f"{GGUF_ARCH}.target_layers", layers)  # llama.cpp b11549 (xllamacpp 2026.10.11549)
    writer.add_array(f"{GGUF_ARCH}.extract_layers", layers)  # the first eagle3 builds' name for it
    writer.add_uint32(f"{GGUF_ARCH}.target_hidden_size", ckpt.hidden_size)
    writer.add_bool(f"{GGUF_ARCH}.norm_before_residual", False)
    if target.suffix == ".gguf" or target.is_file():
        _copy_tokenizer(writer, target)
    else:
        _write_hf_tokenizer(writer, target, ckpt.vocab_size)

    for name, gguf_name in GGUF_TENSOR_NAMES.items():
        tensor = fc if name == "fc.weight" else ckpt.tensors[name]
        if name == "d2t":
            writer.add_tensor(gguf_name, draft_to_target_ids(tensor).numpy(), raw_dtype=gguf.GGMLQuantizationType.I64)
            continue
        if name.endswith("q_proj.weight"):
            tensor = rope_permute(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = rope_permute(tensor, kv_heads)
        _add_float_tensor(writer, gguf_name, tensor, dtype if tensor.dim() > 1 else "float32")
    if rope_type == "llama3":
        _add_float_tensor(writer, "rope_freqs.weight", llama3_rope_factors(rope, head_dim), "float32")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote the EAGLE-3 GGUF of %s to %s", ckpt.directory, out)
    return out


def _add_float_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> None:
    import gguf

    tensor = tensor.detach().cpu().contiguous()
    if dtype == "bfloat16":  # numpy has no bfloat16: hand the raw bits over
        bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        writer.add_tensor(name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        writer.add_tensor(name, tensor.to(DTYPES[dtype]).numpy())


def _copy_tokenizer(writer, target: Path) -> None:
    """Copy every ``tokenizer.*`` field of the target GGUF (the draft must share the target's vocabulary)."""
    from gguf import GGUFReader, GGUFValueType

    for key, field in GGUFReader(str(target)).fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def _write_hf_tokenizer(writer, target: Path, vocab_size: int) -> None:
    """The target's vocabulary from its Hugging Face tokenizer files, padded to ``vocab_size`` as llama.cpp's
    converter pads it. The pre-tokenizer is written as ``default``: llama.cpp's converter recognises it by hashing
    sample tokenizations, which this export does not reproduce (the draft never tokenizes text itself)."""
    import gguf

    vocab = None
    for cls in (gguf.vocab.BpeVocab, gguf.vocab.SentencePieceVocab):
        try:
            vocab = cls(target)
            break
        except (FileNotFoundError, ImportError, KeyError):
            continue
    if vocab is None:
        raise ValueError(f"target {str(target)!r} has neither a byte-level BPE nor a SentencePiece tokenizer: "
                         "convert the target with llama.cpp's convert_hf_to_gguf.py and pass its GGUF instead")
    log.warning("rebuilding the vocabulary from %s; passing the target's GGUF instead copies it exactly", target)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise ValueError(f"target tokenizer has {len(tokens)} tokens, more than the vocabulary size {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(target, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(writer)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


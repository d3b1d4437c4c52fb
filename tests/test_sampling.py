import pytest
import torch

from falconspec.sampling import (
    MIN_TEMPERATURE,
    SamplingParams,
    inverse_cdf_sample,
    position_uniforms,
)


@pytest.mark.parametrize("temperature", [0.0, 1e-45, 5e-324, MIN_TEMPERATURE / 2])
def test_a_tiny_temperature_is_greedy(temperature):
    assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-45, 1e-8])
def test_a_tiny_top_p_keeps_the_top_token(top_p):
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.1, 0.2, 0.3]])
    probs = SamplingParams(temperature=0.7, top_p=top_p).target_probs(logits)
    assert torch.isfinite(probs).all()
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert inverse_cdf_sample(probs, torch.tensor([0.0, 0.999])).tolist() == [1, 0]


def test_the_smallest_sampling_temperature_gives_a_distribution():
    logits = torch.tensor([0.0, 50.0, 49.99999, -30.0])
    probs = SamplingParams(temperature=MIN_TEMPERATURE, top_p=0.5, top_k=3).target_probs(logits)
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)


def test_inverse_cdf_sample_picks_by_cumulative_probability():
    probs = torch.tensor([0.1, 0.0, 0.2, 0.7, 0.0])
    uniforms = torch.tensor([0.0, 0.0999, 0.1001, 0.2999, 0.3001, 0.99, 1.0 - 2.0 ** -53], dtype=torch.float64)
    assert inverse_cdf_sample(probs.expand(len(uniforms), -1), uniforms).tolist() == [0, 0, 2, 2, 3, 3, 3]
    # unnormalised rows scale the uniform by their total; a zero-probability token is never drawn
    assert inverse_cdf_sample(torch.tensor([[0.0, 2.0, 0.0], [1e-30, 0.0, 0.0]]), torch.tensor([0.9999, 0.5])).tolist() == [1, 0]


def test_position_uniforms_are_keyed_by_seed_and_position():
    a = position_uniforms(7, 0, 1000)
    assert a == position_uniforms(7, 0, 1000) and a[10:20] == position_uniforms(7, 10, 10)
    assert all(0.0 <= u < 1.0 for u in a) and len(set(a)) == 1000
    assert a != position_uniforms(8, 0, 1000) and position_uniforms(-1, 0, 3) == position_uniforms(2**64 - 1, 0, 3)
    # uniform: ten equal bins over 1000 draws (chi-square, 9 degrees of freedom, far tail)
    counts = torch.histc(torch.tensor(a), bins=10, min=0.0, max=1.0)
    assert float(((counts - 100) ** 2 / 100).sum()) < 40

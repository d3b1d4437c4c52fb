import pytest
import torch

from falconspec.sampling import MIN_TEMPERATURE, SamplingParams, sample


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
    assert sample(probs[0], torch.Generator().manual_seed(0)) == 1


def test_the_smallest_sampling_temperature_gives_a_distribution():
    logits = torch.tensor([0.0, 50.0, 49.99999, -30.0])
    probs = SamplingParams(temperature=MIN_TEMPERATURE, top_p=0.5, top_k=3).target_probs(logits)
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)

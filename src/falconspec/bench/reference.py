"""Agreement with a float32 reference: how close a bf16 (or fp16) run stays to what the model says in float32.

In bf16 a batched verification forward rounds differently from a one-token step, so near-ties flip for every
method, plain decoding and Hugging Face's included: identity to bf16 greedy is not the criterion there. Instead
each answer is checked against the float32 model by teacher forcing: one float32 forward over prompt + answer
gives the float32 argmax after every prefix, and the answer agrees up to its first token that differs (an answer
that stopped at EOS must also have EOS as the float32 choice there). Reported per method: prompts whose every turn
agrees entirely, and the mean number of tokens before the first divergence per turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..target import TargetModel


@dataclass(frozen=True)
class Agreement:
    identical: bool  # every answer token (and a final EOS) is the float32 argmax
    prefix_tokens: int  # answer tokens before the first divergence (all of them when identical)


@torch.no_grad()
def fp32_agreement(reference: TargetModel, prompt_ids: list[int], answer_ids: list[int],
                   stopped_at_eos: bool) -> Agreement:
    """Teacher-forced check of ``answer_ids`` after ``prompt_ids`` against the float32 ``reference``."""
    ids = torch.tensor([prompt_ids + answer_ids], device=reference.device)
    hidden = reference.decoder(input_ids=ids).last_hidden_state[0, len(prompt_ids) - 1:]  # [len(answer) + 1, H]
    predicted = reference.logits(hidden).argmax(-1).tolist()
    for i, token in enumerate(answer_ids):
        if predicted[i] != token:
            return Agreement(False, i)
    if stopped_at_eos and predicted[len(answer_ids)] not in reference.eos_token_ids:
        return Agreement(False, len(answer_ids))
    return Agreement(True, len(answer_ids))


def summarize_agreement(per_prompt: list[list[Agreement]]) -> dict:
    """{"identical": prompts whose every turn agrees, "prompts", "mean_prefix_tokens": per turn}."""
    turns = [a for prompt in per_prompt for a in prompt]
    return {"identical": sum(all(a.identical for a in prompt) for prompt in per_prompt), "prompts": len(per_prompt),
            "mean_prefix_tokens": sum(a.prefix_tokens for a in turns) / len(turns) if turns else None}

"""The one request validator: the same checks and messages for the library, the CLI and the server."""

import pytest

from falconspec.cli import main
from falconspec.generate import SpeculativeGenerator
from falconspec.request import (
    RequestError,
    check_budget,
    check_input_ids,
    check_request,
    check_stop,
)
from falconspec.sampling import SamplingParams

BAD = {  # arguments of check_request / SpeculativeGenerator.stream: (param, message)
    "no prompt": ({}, None, "exactly one of prompt, messages or input_ids"),
    "two prompts": ({"prompt": "a", "input_ids": [1]}, None, "exactly one"),
    "blank prompt": ({"prompt": "  "}, "prompt", "prompt is empty"),
    "prompt not a string": ({"prompt": 5}, "prompt", "prompt must be a string"),
    "empty messages": ({"messages": []}, "messages", "non-empty list"),
    "message without content": ({"messages": [{"role": "user"}]}, "messages", r"messages\[0\] needs"),
    "empty input_ids": ({"input_ids": []}, "input_ids", "input_ids is empty"),
    "max_new_tokens zero": ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens", "integer >= 1"),
    "max_new_tokens bool": ({"prompt": "a", "max_new_tokens": True}, "max_new_tokens", "integer >= 1"),
    "negative temperature": ({"prompt": "a", "temperature": -1}, "temperature", "finite number >= 0"),
    "nan temperature": ({"prompt": "a", "temperature": float("nan")}, "temperature", "finite number >= 0"),
    "top_p zero": ({"prompt": "a", "top_p": 0}, "top_p", r"\(0, 1\]"),
    "negative top_k": ({"prompt": "a", "top_k": -1}, "top_k", ">= 0"),
    "seed out of range": ({"prompt": "a", "seed": 2**64}, "seed", r"\[-2\*\*63, 2\*\*64\)"),
    "empty stop": ({"prompt": "a", "stop": [""]}, "stop", "non-empty string"),
    "stop not a string": ({"prompt": "a", "stop": [5]}, "stop", "non-empty string"),
    "surrogate stop": ({"prompt": "a", "stop": "\ud800"}, "stop", "lone surrogate"),
    "ignore_eos not a bool": ({"prompt": "a", "ignore_eos": "yes"}, "ignore_eos", "true or false"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_name_the_parameter(name, llama):
    kwargs, param, message = BAD[name]
    with pytest.raises(RequestError, match=message) as err:
        check_request(**kwargs)
    assert err.value.param == param and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match=message):  # the library says the same
        next(SpeculativeGenerator(llama).stream(**kwargs))


def test_a_good_request_is_normalised():
    request = check_request(input_ids=(3, 4), stop="x", temperature=0.5, top_k=5, seed=1)
    assert request.input_ids == [3, 4] and request.stop == ["x"] and request.max_new_tokens == 128
    assert request.params == SamplingParams(0.5, 1.0, 5, 1)
    assert check_stop(None) == [] and check_stop(("a", "b")) == ["a", "b"]
    with pytest.raises(RequestError, match="seed"):
        SamplingParams(seed=-(2**63) - 1)  # SamplingParams checks with the same validator


def test_the_prompt_against_the_model(llama):
    with pytest.raises(RequestError, match=r"lie in \[0, 5\)") as err:
        check_input_ids([1, 9], vocab_size=5)
    assert err.value.param == "input_ids"
    with pytest.raises(RequestError, match="context is 10 tokens") as err:
        check_budget(10, 1, 10)
    assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"
    with pytest.raises(RequestError, match="exceeds the model's context of 10: ask for at most 2") as err:
        check_budget(8, 3, 10, param="max_tokens")
    assert err.value.param == "max_tokens" and check_budget(8, 2, 10) == 2
    context = llama.max_context
    with pytest.raises(ValueError, match=f"ask for at most {context - 3}"):
        next(SpeculativeGenerator(llama).stream(input_ids=[1, 2, 3], max_new_tokens=context))


def test_the_cli_checks_the_request_before_loading_the_model(capsys):
    assert main(["generate", "hi", "--model", "no-such-model-anywhere", "--temperature", "-1"]) == 2
    assert "temperature must be a finite number >= 0" in capsys.readouterr().err

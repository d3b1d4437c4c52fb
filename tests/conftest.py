import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from falconspec.testing import tiny_target  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def llama():
    return tiny_target("llama")


@pytest.fixture(scope="session")
def qwen2():
    return tiny_target("qwen2", seed=1)


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def any_target(request):
    return tiny_target(request.param, seed=2)

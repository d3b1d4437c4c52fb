import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import json  # noqa: E402
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# calibrations of the tests' tiny models go to a throw-away directory, never to the user's cache
if "FALCONSPEC_CALIBRATION_DIR" not in os.environ:
    os.environ["FALCONSPEC_CALIBRATION_DIR"] = tempfile.mkdtemp(prefix="falconspec-calibration-")
    atexit.register(shutil.rmtree, os.environ["FALCONSPEC_CALIBRATION_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from falconspec.data import GenDataConfig, generate_dataset  # noqa: E402
from falconspec.testing import save_tiny_model, tiny_target  # noqa: E402

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


WORDS = ["red", "green", "blue", "sky", "sea"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny target and self-distilled data for it (its greedy answers), plus held-out data."""
    root = tmp_path_factory.mktemp("train")
    model_dir = save_tiny_model(root / "tiny")
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": " ".join(WORDS[(i + j) % 5] for j in range(3))},
                                               {"from": "gpt", "value": "-"}]} for i in range(10)]
    (root / "c.json").write_text(json.dumps(convs))
    common = dict(model=str(model_dir), source=str(root / "c.json"), mode="self-distilled", max_len=96,
                  max_new_tokens=40, gen_dtype="float32", shard_size=4)
    generate_dataset(GenDataConfig(**common, out=str(root / "train"), split="all", limit=8))
    held = json.loads((root / "c.json").read_text())[8:]
    (root / "held.json").write_text(json.dumps(held))
    generate_dataset(GenDataConfig(**{**common, "source": str(root / "held.json")}, out=str(root / "held"), split="all"))
    return root

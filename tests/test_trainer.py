"""The one training loop (:mod:`falconspec.trainer`): every objective still trains exactly as its own loop did.

``tests/data/trainer_reference.json`` holds what the per-kind loops wrote before they became objectives of one
loop (a few steps on the tiny target, fixed seeds): the train and eval records of log.jsonl (timings left out),
the keys of recipe.json and state.pt. Re-record with ``FALCONSPEC_RECORD_TRAINER=1`` only on purpose.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REFERENCE = Path(__file__).parent / "data" / "trainer_reference.json"
TIMINGS = {"tok_per_s", "seconds", "elapsed"}


def heldout_token_shards(root: Path, vocab_size: int) -> Path:
    """A one-shard token dataset (held-out split) for EAGLE-3's acc@d."""
    from falconspec.token_data import (
        FORMAT_NAME,
        FORMAT_VERSION,
        TokenSample,
        write_token_shard,
    )

    out = root / "tokens"
    g = torch.Generator().manual_seed(5)
    samples = [TokenSample(f"h{i}", torch.randint(4, vocab_size, (20 + 3 * i,), generator=g).tolist(), [(6, 20 + 3 * i)],
                           [False]) for i in range(3)]
    write_token_shard(out / "shards" / "heldout-00000.npz", samples, vocab_size)
    (out / "manifest.json").write_text(json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                                   "shards": [{"split": "heldout",
                                                               "file": "shards/heldout-00000.npz"}]}))
    return out


def summary(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    recipe = json.loads((out / "drafter" / "recipe.json").read_text())
    weights = load_file(str(out / "drafter" / "model.safetensors"))
    return {"weights": {name: float(t.double().abs().sum()) for name, t in sorted(weights.items())},
            "records": [{k: v for k, v in r.items() if k not in TIMINGS} for r in records],
            "state_keys": sorted(state), "recipe_keys": sorted(recipe), "step": state["step"]}


def run_every_objective(root: Path, stop_first_at: int | None = None) -> dict:
    """Train every objective for 3 steps (first to ``stop_first_at``, then resumed), each in a fresh directory."""
    from falconspec.testing import tiny_target
    from falconspec.train import TrainConfig, train
    from falconspec.train_eagle3 import Eagle3TrainConfig
    from falconspec.train_eagle3 import train as train_eagle3

    common = {"data": str(root / "train"), "eval_data": str(root / "held"), "model": str(root / "tiny"), "max_steps": 3,
                  "eval_every": 2, "save_every": 2, "log_every": 1, "draft_vocab": 40, "lr": 3e-3, "warmup": 2, "batch_size": 2,
                  "eval_samples": 2}
    runs = {"falcon": {"k": 2}, "eagle": {"k": 1, "glance": False}, "medusa": {"kind": "medusa", "medusa_heads": 3}}
    steps = [3] if stop_first_at is None else [stop_first_at, 3]
    tag = "" if stop_first_at is None else f"-resumed-at-{stop_first_at}"
    result = {}
    for name, options in runs.items():
        out = root / f"ref-{name}{tag}"
        for max_steps in steps:
            train(TrainConfig(out=str(out), **{**common, "max_steps": max_steps}, **options))
        result[name] = summary(out)
    out = root / f"ref-eagle3{tag}"
    vocab_size = tiny_target("llama").vocab_size
    for max_steps in steps:
        train_eagle3(Eagle3TrainConfig(out=str(out), model=str(root / "tiny"), data=str(root / "c.json"),
                                       eval_data=str(heldout_token_shards(root, vocab_size)), max_samples=8,
                                       max_len=96, tokens_per_batch=192, max_steps=max_steps, lr=5e-3, warmup=1,
                                       draft_vocab=40, vocab_samples=4, eval_samples=2, eval_every=2, save_every=2))
    result["eagle3"] = summary(out)
    return result


def close(got, want, path=""):
    """Equal structure and keys; numbers equal to float32 rounding."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, list(got), list(want))
        for key in want:
            close(got[key], want[key], f"{path}.{key}")
    elif path.endswith("_keys"):  # state.pt and recipe.json: every key the old loops wrote is still there
        assert set(want) <= set(got), (path, got, want)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (path, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (path, got, want)
    else:
        assert got == want, (path, got, want)


def test_every_objective_trains_as_before(tiny_data):
    got = run_every_objective(tiny_data)
    if os.environ.get("FALCONSPEC_RECORD_TRAINER"):
        REFERENCE.write_text(json.dumps(got, indent=1) + "\n")
    close(got, json.loads(REFERENCE.read_text()))


def test_resuming_gives_the_uninterrupted_run(tiny_data):
    """Stopped after step 2 (the warmup keeps steps 1-2's learning rates independent of --max-steps) and resumed
    to step 3: the same records and the same drafter as one run of 3 steps. Not falcon: its glance ratio decays
    over --max-steps, so a shorter first session glances differently (by design)."""
    def comparable(runs: dict) -> dict:  # "tokens" counts what this process read, so it restarts at a resume
        return {name: {**run, "records": [{k: v for k, v in r.items() if k != "tokens"} for r in run["records"]]}
                for name, run in runs.items() if name != "falcon"}

    got = run_every_objective(tiny_data, stop_first_at=2)
    close(comparable(got), comparable(json.loads(REFERENCE.read_text())))
    for name in got:
        state = torch.load(tiny_data / f"ref-{name}-resumed-at-2" / "checkpoint" / "state.pt", weights_only=False)
        assert [s["start_step"] for s in state["sessions"]] == [0, 2]


def test_registry_names_every_drafter_kind_once():
    from falconspec.bench.methods import CHECKPOINT_METHODS, ENGINE_METHODS
    from falconspec.drafters import MODEL_FREE, SHIPPED_KINDS
    from falconspec.drafters.registry import (
        KINDS,
        kind_for_format,
        objectives,
        shard_objectives,
    )
    from falconspec.train_common import TrainConfig
    from falconspec.train_eagle3 import Eagle3TrainConfig
    from falconspec.trainer import Objective

    assert SHIPPED_KINDS == CHECKPOINT_METHODS == ("falcon", "eagle", "eagle3", "medusa")
    assert sorted(MODEL_FREE) == ["lookahead", "none", "pld"]
    assert ENGINE_METHODS == ("greedy", "pld", "falcon", "eagle", "eagle3", "medusa", "lookahead")
    assert list(objectives()) == ["sar", "eagle3", "medusa"] and list(shard_objectives()) == ["sar", "medusa"]
    assert all(issubclass(cls, Objective) for cls in objectives().values())
    for kind in KINDS:
        if not kind.model_free:
            assert kind_for_format(kind.format).format == kind.format
    assert kind_for_format("something-else").name == "falcon"  # whose config check names the wrong format
    for cls, config in ((shard_objectives()["sar"], TrainConfig), (objectives()["eagle3"], Eagle3TrainConfig)):
        names = {f for f in config.__dataclass_fields__}
        assert {"out", "max_steps", "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "log_every", "eval_every",
                "save_every", "seed"} <= names, cls


def test_moving_average_of_the_weights_is_the_drafter_and_resumes(tiny_data):
    """--ema-decay d: the drafter saved is d * (the weights before the step) + (1 - d) * (after it) for one step; the
    checkpoint keeps the trained weights and the average, so a run stopped at step 2 and resumed to 3 saves the same
    drafter, history and records as one run of 3 steps; the trained weights' evaluation is logged beside."""
    from falconspec.train import TrainConfig, train

    common = {"data": str(tiny_data / "train"), "eval_data": str(tiny_data / "held"), "model": str(tiny_data / "tiny"),
              "eval_every": 2, "save_every": 2, "log_every": 1, "draft_vocab": 40, "lr": 3e-3, "warmup": 2,
              "batch_size": 2, "eval_samples": 2, "k": 1, "glance": False}
    weights = lambda out, sub="drafter": load_file(str(out / sub / "model.safetensors"))  # noqa: E731
    with pytest.raises(ValueError, match="--ema-decay"):
        TrainConfig(out=str(tiny_data / "bad"), max_steps=1, ema_decay=1.0, **common)
    train(TrainConfig(out=str(tiny_data / "w0"), max_steps=0, **common))
    train(TrainConfig(out=str(tiny_data / "ema1"), max_steps=1, ema_decay=0.75, **common))
    before, after = weights(tiny_data / "w0"), weights(tiny_data / "ema1", "checkpoint")
    saved = weights(tiny_data / "ema1")
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the step moved the weights
    for name, w0 in before.items():
        want = w0 if not w0.is_floating_point() else 0.75 * w0 + 0.25 * after[name]
        torch.testing.assert_close(saved[name], want, rtol=1e-6, atol=1e-7)

    for out, max_steps in (("ema-once", 3), ("ema-resumed", 2), ("ema-resumed", 3)):
        train(TrainConfig(out=str(tiny_data / out), max_steps=max_steps, ema_decay=0.5, **common))
    once, resumed = summary(tiny_data / "ema-once"), summary(tiny_data / "ema-resumed")
    evaluations = [sorted(r) for r in resumed["records"] if "eval" in r or "eval_trained" in r]
    assert evaluations == [["eval_trained"], ["eval"]] * 2  # steps 2 and 3
    drop_tokens = lambda s: [{k: v for k, v in r.items() if k != "tokens"} for r in s["records"]]  # noqa: E731
    close(drop_tokens(resumed), drop_tokens(once))
    close(resumed["weights"], once["weights"])
    assert "ema" in resumed["state_keys"]
    trained = load_file(str(tiny_data / "ema-once" / "checkpoint" / "model.safetensors"))
    assert any(not torch.equal(trained[n], t) for n, t in weights(tiny_data / "ema-once").items())


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_freed_heap_memory_goes_back_to_the_system():
    """The training loop trims the allocator every log_every steps: small freed tensors between live ones stay in
    glibc's heap (resident) until ``malloc_trim`` hands their pages back."""
    from falconspec.trainer import _malloc_trim, release_freed_memory

    if _malloc_trim() is None:
        pytest.skip("the C library has no malloc_trim")

    def resident_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    release_freed_memory()
    before = resident_mb()
    small = [torch.ones(3000 + i % 500) for i in range(25_000)]  # ~13 KB each, ~320 MB, under mmap's threshold
    kept = small[::50]  # live tensors spread over the heap, so its top cannot shrink
    del small
    freed = resident_mb()
    assert freed - before > 200, "the freed tensors' pages stay resident"
    assert release_freed_memory()
    assert resident_mb() - before < (freed - before) / 2
    del kept

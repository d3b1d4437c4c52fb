"""Self-distilled token data: shards, manifest, resume, multi-turn prompts, batching, features from tokens."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from falconspec.data import Conversation, GenDataConfig, ShardDataset, generate_dataset
from falconspec.testing import save_tiny_model
from falconspec.token_data import (
    FORMAT_NAME, Dialogue, GenStats, TokenDataConfig, TokenSample, features_from_tokens, generate_token_dataset,
    iter_token_samples, read_manifest, read_token_shard, regenerate, stream_dialogues, token_dtype, user_turns,
    write_token_shard,
)
from repo_scripts import load_script


def quiet(*_):
    pass


def conv(i, turns):
    messages = []
    for t in range(turns):
        messages += [{"role": "user", "content": f"q{i} turn {t}" + " more" * ((i + t) % 4)},
                     {"role": "assistant", "content": "the dataset's answer, not used"}]
    return Conversation(f"c{i}", messages)


def write_convs(path, n, turns=2):
    records = [{"id": c.id, "conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]],
                                               "value": m["content"]} for m in c.messages]}
               for c in (conv(i, 1 + (i + turns - 1) % turns) for i in range(n))]
    path.write_text(json.dumps(records))
    return path


def token_dataset_with_heldout(out, tiny_dir, train_limit):
    """A greedy token dataset of the tiny model at ``out``: ``train_limit`` train conversations and two held out."""
    from falconspec.data import is_heldout

    held = [i for i in range(400) if is_heldout(f"c{i}")][:2]
    src = write_convs(out.parent / "c.json", max(held) + 1)
    common = dict(model=str(tiny_dir), source=str(src), max_len=96, max_new_tokens=12, gen_dtype="float32",
                  shard_size=3, batch_size=3, out=str(out))
    generate_token_dataset(TokenDataConfig(**common, split="train", limit=train_limit), progress=quiet)
    generate_token_dataset(TokenDataConfig(**common, split="heldout"), progress=quiet)


def test_token_shard_round_trip(tmp_path):
    samples = [TokenSample("a", [1, 2, 3, 70000 % 128, 5], [(2, 4)], [False]),
               TokenSample("b_1", list(range(100)), [(10, 20), (30, 99)], [True, False])]
    write_token_shard(tmp_path / "s.npz", samples, vocab_size=128)
    back = read_token_shard(tmp_path / "s.npz")
    assert back == samples and back[1].loss_mask == [0] * 10 + [1] * 10 + [0] * 10 + [1] * 69 + [0]
    with np.load(tmp_path / "s.npz") as z:
        assert z["tokens"].dtype == np.uint16 and z["spans"].shape == (3, 2)
    assert token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(151936) == np.int32
    write_token_shard(tmp_path / "big.npz", [TokenSample("x", [0, 151935], [(1, 2)], [False])], vocab_size=151936)
    assert read_token_shard(tmp_path / "big.npz")[0].input_ids == [0, 151935]
    write_token_shard(tmp_path / "empty.npz", [], vocab_size=128)  # every conversation of a shard was too long
    assert read_token_shard(tmp_path / "empty.npz") == []
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_token_shard(tmp_path / "bad.npz", [TokenSample("x", [128], [], [])], vocab_size=128)


def test_user_turns_drop_dataset_answers_and_empty_turns():
    c = Conversation("x", [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
                           {"role": "assistant", "content": "A"}, {"role": "user", "content": "  "},
                           {"role": "assistant", "content": "B"}, {"role": "user", "content": "c"}])
    lead, turns = user_turns(c)
    assert lead == [{"role": "system", "content": "sys"}]
    assert turns == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "c"}]]


@pytest.mark.parametrize("cache", ["dynamic", "reuse"])
def test_multi_turn_prompts_hold_the_models_own_answers(llama, cache):
    tok, model = llama.tokenizer, llama.model
    c = Conversation("m", [{"role": "system", "content": "be brief"}] + conv(1, 3).messages)
    [sample], _ = regenerate(model, tok, [c], max_len=400, max_new_tokens=10, batch_size=4, cache=cache)
    assert len(sample.spans) == 3
    # the sequence is the chat template over the conversation with the dataset's answers replaced by the model's
    answers = [sample.input_ids[lo:hi] for lo, hi in sample.spans]
    messages = [c.messages[0]]
    for turn, answer in zip(user_turns(c)[1], answers):
        text = tok.decode(answer[:-1] if answer[-1] == tok.eos_token_id else answer)
        messages += turn + [{"role": "assistant", "content": text}]
    rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert sample.input_ids == rendered[: len(sample.input_ids)]
    # each answer is the model's greedy continuation of everything before it (its own earlier answers included)
    for (lo, hi), cut in zip(sample.spans, sample.cut):
        alone = model.generate(torch.tensor([sample.input_ids[:lo]]), max_new_tokens=10, do_sample=False)
        assert sample.input_ids[lo:hi] == alone[0, lo: lo + hi - lo].tolist()
        assert cut == (sample.input_ids[hi - 1] != tok.eos_token_id)


def test_context_cut_ends_the_conversation(llama):
    c = conv(0, 3)
    [full], _ = regenerate(llama.model, llama.tokenizer, [c], max_len=400, max_new_tokens=8, batch_size=2)
    second_prompt = full.spans[1][0]
    [cut], _ = regenerate(llama.model, llama.tokenizer, [c], max_len=second_prompt + 15, max_new_tokens=8,
                          batch_size=2)
    assert cut.spans == full.spans[:1] and cut.input_ids == full.input_ids[: full.spans[0][1]]
    [budget], _ = regenerate(llama.model, llama.tokenizer, [c], max_len=second_prompt + 18, max_new_tokens=8,
                             batch_size=2)
    assert len(budget.spans) == 2 and len(budget.input_ids) <= second_prompt + 18  # the budget shrinks to fit
    assert regenerate(llama.model, llama.tokenizer, [c], max_len=32, max_new_tokens=8, batch_size=2)[0] == []


def test_batched_answers_equal_one_at_a_time_in_fp32(qwen2):
    convs = [conv(i, 1 + i % 3) for i in range(7)]
    one, _ = regenerate(qwen2.model, qwen2.tokenizer, convs, max_len=300, max_new_tokens=12, batch_size=1)
    batched, stats = regenerate(qwen2.model, qwen2.tokenizer, convs, max_len=300, max_new_tokens=12, batch_size=5)
    assert batched == one and len(one) == 7
    assert stats.answers == sum(1 + i % 3 for i in range(7)) == sum(len(s.spans) for s in one)
    assert stats.answer_tokens == sum(s.answer_tokens for s in one) and stats.tokens_per_s > 0
    assert stats.prefilled_tokens < stats.prompt_tokens  # later turns prefill only their new tokens
    for cache in ("dynamic", "static"):  # generate, prefilling every prompt whole: the same answers
        again, generated = regenerate(qwen2.model, qwen2.tokenizer, convs[:4], max_len=300, max_new_tokens=12,
                                      batch_size=3, cache=cache)
        assert again == one[:4] and generated.prefilled_tokens == generated.prompt_tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tok") / "tiny")


def test_manifest_and_resume_skip_done_conversations(tmp_path, tiny_dir):
    src = write_convs(tmp_path / "c.json", 7, turns=3)
    cfg = TokenDataConfig(model=str(tiny_dir), source=str(src), out=str(tmp_path / "d"), split="all",
                          max_len=200, max_new_tokens=8, shard_size=3, batch_size=4, gen_dtype="float32",
                          max_shards=1)
    run = generate_token_dataset(cfg, progress=quiet)
    assert run["shards"] == 1 and run["answers"] > 3 and run["answer_tokens_per_s"] > 0
    manifest = read_manifest(tmp_path / "d")
    assert manifest["format"] == FORMAT_NAME and manifest["token_dtype"] == "uint16"
    assert len(manifest["target"]["weights_sha256"]) == 64 and manifest["target"]["vocab_size"] == 101
    assert manifest["chat_template"]["text"].startswith("{% for message")
    assert manifest["generation"]["max_new_tokens"] == 8 and manifest["generation"]["decoding"] == "greedy"
    [shard] = manifest["shards"]
    assert shard["conversations"] == ["c0", "c1", "c2"] and shard["split"] == "all"
    samples = read_token_shard(tmp_path / "d" / shard["file"])
    assert [s.id for s in samples] == ["c0", "c1", "c2"]
    assert shard["answers"] == sum(len(s.spans) for s in samples) == 1 + 2 + 3
    assert shard["tokens"] == sum(len(s.input_ids) for s in samples)
    assert manifest["totals"]["all"]["answer_tokens"] == shard["answer_tokens"] == run["answer_tokens"]

    # a rerun (on any machine) skips the finished conversations and appends shards; a limit counts done ones
    generate_token_dataset(TokenDataConfig(**{**cfg.__dict__, "max_shards": None, "limit": 5}), progress=quiet)
    run2 = generate_token_dataset(TokenDataConfig(**{**cfg.__dict__, "max_shards": None}), progress=quiet)
    manifest = read_manifest(tmp_path / "d")
    assert [s["conversations"] for s in manifest["shards"]] == [["c0", "c1", "c2"], ["c3", "c4"], ["c5", "c6"]]
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2] and len(manifest["runs"]) == 3
    assert run2["conversations"] == 2 and generate_token_dataset(cfg, progress=quiet) == {}
    # one-at-a-time generation in another run gives the same tokens (fp32)
    one, _ = regenerate(*_tiny_model(tiny_dir), [conv(i, 1 + (i + 2) % 3) for i in range(3, 5)], 200, 8, 1)
    assert read_token_shard(tmp_path / "d" / manifest["shards"][1]["file"]) == one
    with pytest.raises(ValueError, match="other generation settings.*max_new_tokens"):  # even with nothing to do
        generate_token_dataset(TokenDataConfig(**{**cfg.__dict__, "max_new_tokens": 9}), progress=quiet)
    write_convs(src, 8, turns=3)  # the source grew: one new conversation, but other settings are refused
    with pytest.raises(ValueError, match="other generation settings.*max_new_tokens"):
        generate_token_dataset(TokenDataConfig(**{**cfg.__dict__, "max_new_tokens": 9}), progress=quiet)


def test_sampled_answers_make_a_dataset_of_their_own(tmp_path, tiny_dir):
    """--temperature: other answers to the same prompts, reproducible from the run's recorded seed; the manifest says
    how they were decoded, and a greedy dataset is never grown with sampled answers (nor the reverse)."""
    src = write_convs(tmp_path / "c.json", 6, turns=3)
    greedy = TokenDataConfig(model=str(tiny_dir), source=str(src), out=str(tmp_path / "greedy"), split="all",
                             max_len=200, max_new_tokens=8, shard_size=6, batch_size=4, gen_dtype="float32")
    sampled = TokenDataConfig(**{**greedy.__dict__, "out": str(tmp_path / "t1"), "temperature": 1.0, "seed": 3})
    again = TokenDataConfig(**{**sampled.__dict__, "out": str(tmp_path / "t1-again")})

    def tokens(cfg):
        generate_token_dataset(cfg, progress=quiet)
        manifest = read_manifest(cfg.out)
        return manifest, [s.input_ids for s in read_token_shard(tmp_path / cfg.out / manifest["shards"][0]["file"])]

    (plain, greedy_ids), (manifest, sampled_ids) = tokens(greedy), tokens(sampled)
    assert plain["generation"]["decoding"] == "greedy" and "temperature" not in plain["generation"]
    assert manifest["generation"]["decoding"] == "sampling" and manifest["generation"]["temperature"] == 1.0
    assert manifest["runs"][0]["sampling_seed"] == (3 * 100_003 + 0) * 1_009 + 0
    assert sampled_ids != greedy_ids, "a random tiny model sampled at temperature 1 answers otherwise"
    assert tokens(again)[1] == sampled_ids, "the same seed, run and rank draw the same answers"
    write_convs(src, 7, turns=3)  # one conversation more to answer, but not in the other decoding
    for cfg, out in ((sampled, greedy.out), (greedy, sampled.out)):
        with pytest.raises(ValueError, match="other generation settings.*decoding"):
            generate_token_dataset(TokenDataConfig(**{**cfg.__dict__, "out": out}), progress=quiet)
    for bad in ({"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": 0.7, "cache": "dynamic"}):
        with pytest.raises(ValueError, match="temperature"):
            TokenDataConfig(**{**greedy.__dict__, **bad})


def test_rounds_that_end_early_answer_as_rounds_that_run_to_the_end(qwen2, monkeypatch):
    """A round ends once a quarter of its rows have ended their answer: the other rows carry their answers into the
    next round while the ended ones take their next turn. In fp32 every answer is what one-row-at-a-time gives,
    with fewer decoding steps padded."""
    import collections

    import falconspec.token_data as token_data

    convs = [conv(i, 1 + i % 3) for i in range(9)]
    budgets = {"max_len": 300, "max_new_tokens": 12}
    # random weights seldom end an answer: make a token the model often writes end one too, so answers end apart
    plain, _ = regenerate(qwen2.model, qwen2.tokenizer, convs, batch_size=1, **budgets)
    counts = collections.Counter(t for s in plain for lo, hi in s.spans for t in s.input_ids[lo:hi - 1])
    eos = token_data.eos_ids(qwen2.model, qwen2.tokenizer)
    monkeypatch.setattr(token_data, "eos_ids", lambda *a: eos + [counts.most_common(3)[-1][0]])

    def stream(refill_at):
        stats = GenStats()
        done = list(stream_dialogues(qwen2.model, qwen2.tokenizer, [Dialogue(c) for c in convs], batch_size=4,
                                     stats=stats, refill_at=refill_at, **budgets))
        return sorted((d.sample for d in done), key=lambda s: s.id), stats

    early, early_stats = stream(0.25)
    to_the_end, end_stats = stream(1.0)
    one, _ = regenerate(qwen2.model, qwen2.tokenizer, convs, batch_size=1, **budgets)
    assert early == to_the_end == sorted(one, key=lambda s: s.id)
    assert early_stats.answers == end_stats.answers == sum(len(s.spans) for s in one)
    assert early_stats.answer_tokens == end_stats.answer_tokens
    assert early_stats.padded_steps < end_stats.padded_steps


def test_reuse_keeps_its_rows_full_across_shards(tmp_path, tiny_dir):
    """--cache reuse streams conversations: a shard holds the next ones to finish, and free rows are refilled from
    the conversations still to do, so batches shrink only once none is left (not at the end of every shard)."""
    src = write_convs(tmp_path / "c.json", 9, turns=3)
    common = dict(model=str(tiny_dir), source=str(src), split="all", max_len=200, max_new_tokens=8, shard_size=2,
                  batch_size=3, gen_dtype="float32")
    lines = []
    generate_token_dataset(TokenDataConfig(**common, out=str(tmp_path / "reuse")), progress=lines.append)
    generate_token_dataset(TokenDataConfig(**common, out=str(tmp_path / "dynamic"), cache="dynamic"), progress=quiet)

    def samples(out):
        shards = read_manifest(out)["shards"]
        return shards, {s.id: s for shard in shards for s in read_token_shard(out / shard["file"])}

    shards, reused = samples(tmp_path / "reuse")
    assert reused == samples(tmp_path / "dynamic")[1], "the same answers, turn by turn"
    assert sorted(c for s in shards for c in s["conversations"]) == sorted(f"c{i}" for i in range(9))
    assert [len(s["conversations"]) for s in shards] == [2, 2, 2, 2, 1]
    rows = [int(line.split()[1]) for line in lines if line.strip().startswith("batch:")]  # prompts per batch
    short = [i for i, r in enumerate(rows) if r < 3]
    assert rows[:3] == [3, 3, 3] and short == list(range(short[0], len(rows))), rows


def test_processes_side_by_side_grow_one_dataset(tmp_path, tiny_dir):
    """Two processes growing one dataset at once (as under torchrun) answer disjoint conversations, every i-th one
    each, and record all their shards and both runs: together they hold exactly what one process writes."""
    src = write_convs(tmp_path / "c.json", 9, turns=3)
    common = dict(model=str(tiny_dir), source=str(src), split="all", max_len=200, max_new_tokens=8, shard_size=2,
                  batch_size=3, gen_dtype="float32")
    generate_token_dataset(TokenDataConfig(**common, out=str(tmp_path / "one")), progress=quiet)
    script = ("import sys; from falconspec.token_data import TokenDataConfig, generate_token_dataset; "
              f"generate_token_dataset(TokenDataConfig(**{common!r}, out={str(tmp_path / 'two')!r}), "
              "progress=lambda *_: None, process=(int(sys.argv[1]), 2))")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(i)]) for i in range(2)]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]

    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert sorted(r["process"] for r in two["runs"]) == ["0/2", "1/2"]
    assert sorted(s["index"] for s in two["shards"]) == list(range(len(two["shards"]))) and len(two["shards"]) == 5
    for run in two["runs"]:
        first = int(run["process"].split("/")[0])
        mine = [c for s in two["shards"] if s["run"] == run["run"] for c in s["conversations"]]
        assert sorted(mine) == sorted(f"c{i}" for i in range(first, 9, 2)) and run["shards"] == 3 - first
    drop = lambda totals: {k: {f: v for f, v in t.items() if f != "shards"} for k, t in totals.items()}  # noqa: E731
    assert drop(two["totals"]) == drop(one["totals"])

    def by_id(out, manifest):
        return {s.id: s for shard in manifest["shards"] for s in read_token_shard(out / shard["file"])}

    assert by_id(tmp_path / "two", two) == by_id(tmp_path / "one", one)
    assert generate_token_dataset(TokenDataConfig(**common, out=str(tmp_path / "two")), progress=quiet) == {}
    with pytest.raises(ValueError, match="process index 2"):
        generate_token_dataset(TokenDataConfig(**common, out=str(tmp_path / "two")), progress=quiet, process=(2, 2))


def test_conversations_recorded_meanwhile_by_another_run_are_left_out(tmp_path, tiny_dir, monkeypatch):
    """Two runs started side by side without torchrun both take every conversation: the one that records second
    leaves out those already recorded instead of storing them twice."""
    import falconspec.token_data as token_data

    src = write_convs(tmp_path / "c.json", 5, turns=2)
    cfg = TokenDataConfig(model=str(tiny_dir), source=str(src), out=str(tmp_path / "d"), split="all", max_len=200,
                          max_new_tokens=8, shard_size=2, batch_size=3, gen_dtype="float32", limit=3)
    generate_token_dataset(cfg, progress=quiet)  # the other run: c0, c1, c2
    real, calls = token_data.done_ids, []
    monkeypatch.setattr(token_data, "done_ids",  # this run started before the other recorded anything
                        lambda manifest, split=None: (calls.append(1), set() if len(calls) == 1 else real(manifest))[1])
    lines = []
    generate_token_dataset(TokenDataConfig(**{**cfg.__dict__, "limit": None}), progress=lines.append)
    shards = read_manifest(tmp_path / "d")["shards"]
    recorded = [c for s in shards for c in s["conversations"]]
    assert sorted(recorded) == [f"c{i}" for i in range(5)], "each conversation once"
    assert [s["run"] for s in shards[:2]] == [0, 0] and {s["run"] for s in shards[2:]} == {1}
    assert any("already recorded by another run are left out" in line for line in lines)


def _tiny_model(path):
    from falconspec.models import load_target
    t = load_target(str(path))
    return t.model, t.tokenizer


def test_features_from_tokens_equal_the_direct_path(tmp_path, tiny_dir, monkeypatch):
    src = write_convs(tmp_path / "c.json", 5, turns=2)
    common = dict(model=str(tiny_dir), source=str(src), split="all", max_len=96, max_new_tokens=20,
                  gen_dtype="float32")
    generate_dataset(GenDataConfig(**common, mode="self-distilled", shard_size=4, out=str(tmp_path / "direct")))
    generate_token_dataset(TokenDataConfig(**common, out=str(tmp_path / "tok"), max_turns=1, shard_size=4,
                                           batch_size=2), progress=quiet)
    assert features_from_tokens(str(tmp_path / "tok"), str(tmp_path / "feat"), model=str(tiny_dir), split="all",
                                max_shards=1, progress=quiet) == 1  # the first shard, then the rest
    assert ShardDataset(tmp_path / "feat").ids == [f"c{i}" for i in range(4)]
    assert features_from_tokens(str(tmp_path / "tok"), str(tmp_path / "feat"), model=str(tiny_dir), split="all",
                                progress=quiet) == 1
    with pytest.raises(ValueError, match="at least 1"):
        features_from_tokens(str(tmp_path / "tok"), str(tmp_path / "feat"), model=str(tiny_dir), split="all",
                             max_shards=0, progress=quiet)
    direct, rebuilt = ShardDataset(tmp_path / "direct"), ShardDataset(tmp_path / "feat")
    assert direct.ids == rebuilt.ids == [f"c{i}" for i in range(5)]
    for a, b in zip(direct, rebuilt):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert rebuilt.meta["split"] == "all" and rebuilt.meta["num_conversations"] == 5
    assert features_from_tokens(str(tmp_path / "tok"), str(tmp_path / "feat"), model=str(tiny_dir), split="all",
                                progress=quiet) == 0  # resumable

    # two processes (torchrun): each writes every second shard, and together they write what one process does
    import accelerate

    for rank in (1, 0):
        fake = type("FakeState", (), {"process_index": rank, "num_processes": 2, "device": torch.device("cpu")})
        monkeypatch.setattr(accelerate, "PartialState", lambda *a, fake=fake, **kw: fake())
        assert features_from_tokens(str(tmp_path / "tok"), str(tmp_path / "split"), model=str(tiny_dir),
                                    split="all", progress=quiet) == 1
        assert sorted(p.name for p in (tmp_path / "split").glob("shard_*")) == \
            [f"shard_{i:05d}.safetensors" for i in range(rank, 2)]
    for a, b in zip(ShardDataset(tmp_path / "split"), rebuilt):
        assert all(torch.equal(a[key], b[key]) for key in a)

    # every turn: one sequence per conversation, loss mask on all of the target's answers
    generate_token_dataset(TokenDataConfig(**common, out=str(tmp_path / "multi"), shard_size=8, batch_size=3),
                           progress=quiet)
    features_from_tokens(str(tmp_path / "multi"), str(tmp_path / "mfeat"), model=str(tiny_dir), split="all",
                         progress=quiet)
    tokens = read_token_shard(tmp_path / "multi" / "shards" / "all-00000.npz")
    for sample, feat in zip(tokens, ShardDataset(tmp_path / "mfeat")):
        assert feat["input_ids"].tolist() == sample.input_ids and feat["loss_mask"].tolist() == sample.loss_mask
    with pytest.raises(ValueError, match="weights hash"):
        features_from_tokens(str(tmp_path / "multi"), str(tmp_path / "other"),
                             model=str(save_tiny_model(tmp_path / "other-model", seed=3)), split="all",
                             progress=quiet)


def test_cli_tokens_then_features(tmp_path, tiny_dir, capsys):
    from falconspec.cli import main

    src = write_convs(tmp_path / "c.json", 4, turns=2)
    common = ["--model", str(tiny_dir), "--source", str(src), "--split", "all"]
    assert main(["gen-data", *common, "--mode", "self-distilled", "--format", "tokens", "--out", str(tmp_path / "t"),
                 "--max-len", "128", "--max-new-tokens", "6", "--shard-size", "2", "--gen-dtype", "float32"]) == 0
    assert "answer tok/s" in capsys.readouterr().out
    assert main(["gen-data", *common, "--format", "tokens", "--out", str(tmp_path / "x")]) == 2  # needs the mode
    assert main(["gen-data", "--model", str(tiny_dir), "--split", "all", "--from-tokens", str(tmp_path / "t"),
                 "--out", str(tmp_path / "f")]) == 0
    assert len(ShardDataset(tmp_path / "f")) == 4


def test_question_files_give_the_same_tokens_as_conversations(tmp_path, tiny_dir):
    # MT-bench / Spec-Bench question records ({"turns": [...]}, user messages only) need no answers: the target
    # writes them, and the dataset's own answers are dropped anyway
    src = write_convs(tmp_path / "c.json", 3, turns=2)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": c["id"], "turns": [t["value"] for t in c["conversations"]
                                                                      if t["from"] == "human"]}) + "\n"
                                 for c in json.loads(src.read_text())))
    common = dict(model=str(tiny_dir), split="all", max_len=128, max_new_tokens=6, shard_size=3, batch_size=2,
                  gen_dtype="float32")
    for name, source in (("conv", src), ("questions", questions)):
        generate_token_dataset(TokenDataConfig(source=str(source), out=str(tmp_path / name), **common),
                               progress=quiet)
    shards = [read_token_shard(tmp_path / name / read_manifest(tmp_path / name)["shards"][0]["file"])
              for name in ("conv", "questions")]
    assert shards[0] == shards[1] and [s.id for s in shards[1]] == ["c0", "c1", "c2"]


def test_training_reads_token_data_as_the_features_it_would_store(tmp_path, tiny_dir, monkeypatch):
    """``falconspec train --data TOKENS --eval-data TOKENS`` computes, as steps read them, exactly the features
    ``gen-data --from-tokens`` stores (its train and held-out splits), so a run on either trains the same drafter;
    with ``--feature-dtype bfloat16`` the train split's features are those of ``--from-tokens --dtype bfloat16``."""
    from falconspec.models import load_target
    from falconspec.train import train
    from falconspec.train_common import TrainConfig, draft_vocabulary, load_data
    from falconspec.token_data import TokenFeatures

    token_dataset_with_heldout(tmp_path / "tok", tiny_dir, train_limit=8)
    for split in ("train", "heldout"):
        features_from_tokens(str(tmp_path / "tok"), str(tmp_path / split), model=str(tiny_dir), split=split,
                             progress=quiet)
    features_from_tokens(str(tmp_path / "tok"), str(tmp_path / "train-bf16"), model=str(tiny_dir), split="train",
                         dtype="bfloat16", progress=quiet)
    target = load_target(str(tiny_dir))
    stored, computed = ShardDataset(tmp_path / "train"), TokenFeatures(tmp_path / "tok", target, str(tiny_dir))
    assert computed.ids == stored.ids and len(computed) == len(stored) >= 6
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a training step's autocast does not reach the target
        items = [computed[i] for i in range(len(computed))]
    for a, b in zip(stored, items):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    view = computed[2:]  # a view: nothing computed until read
    assert view.ids == stored.ids[2:] and torch.equal(view[0]["hidden_states"], items[2]["hidden_states"])
    cfg = TrainConfig(data="", out="", model=str(tiny_dir), draft_vocab=20)
    assert torch.equal(draft_vocabulary(computed, target, cfg), draft_vocabulary(stored.samples, target, cfg)), \
        "fp32 self-distilled answers are the target's greedy tokens"

    import falconspec.token_data as token_data

    import falconspec.models as models

    hashed = []  # one token dataset as --data and --eval-data: its target is checked once
    monkeypatch.setattr(token_data, "weights_sha256", lambda model, real=token_data.weights_sha256:
                        hashed.append(1) or real(model))
    loaded = []  # and with the fp32 target the run loads anyway (bf16 features: one more copy, in bf16)
    monkeypatch.setattr(models, "load_target", lambda *a, real=models.load_target, **kw:
                        loaded.append(kw.get("dtype", "float32")) or real(*a, **kw))
    runs, hashes = {}, {}
    # (bf16 greedy labels are not the answers: the runs in bf16 draft over the full vocabulary, not one chosen by
    # label counts from stored features and by answer counts from tokens)
    for name, data, held_data, dtype in (("features", "train", "heldout", "float32"),
                                         ("tokens", "tok", "tok", "float32"),
                                         ("features-bf16", "train-bf16", "heldout", "float32"),
                                         ("tokens-bf16", "tok", "tok", "bfloat16")):
        cfg = TrainConfig(data=str(tmp_path / data), eval_data=str(tmp_path / held_data), out=str(tmp_path / name),
                          model=str(tiny_dir), max_steps=4, eval_every=4, save_every=4, log_every=1,
                          draft_vocab=0 if name.endswith("bf16") else 20,
                          lr=3e-3, warmup=1, batch_size=2, eval_samples=2, max_len=96, feature_dtype=dtype)
        hashed.clear(), loaded.clear()
        train(cfg)
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        runs[name], hashes[name] = [{k: v for k, v in r.items() if k != "tok_per_s"} for r in log], len(hashed)
    assert runs["tokens"] == runs["features"] and hashes["tokens"] == 1
    assert runs["tokens-bf16"] == runs["features-bf16"] != runs["tokens"] and hashes["tokens-bf16"] == 1
    assert loaded == ["float32", "bfloat16"]  # the tokens-bf16 run's
    # without --eval-data, the samples carved from the train split are scored on fp32 features too
    carved = TrainConfig(data=str(tmp_path / "tok"), out="", model=str(tiny_dir), eval_samples=2, max_len=96,
                         feature_dtype="bfloat16")
    trains, evals, _ = load_data(carved, target)
    assert trains.target.dtype == torch.bfloat16 and len(trains) == len(stored) - 2
    for a, b in zip(stored.samples[-2:], evals):
        assert all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(ValueError, match="stored features"):
        train(TrainConfig(data=str(tmp_path / "train"), out=str(tmp_path / "no"), model=str(tiny_dir),
                          feature_dtype="bfloat16"))
    recipe = json.loads((tmp_path / "tokens" / "drafter" / "recipe.json").read_text())
    assert recipe["data"]["features"].startswith("on the fly") and recipe["train_samples"] == len(stored)
    assert json.loads((tmp_path / "tokens-bf16" / "drafter" / "recipe.json").read_text())["data"]["dtype"] == \
        "bfloat16", "the recipe records the dtype the train features were computed in"
    with pytest.raises(ValueError, match="weights hash"):
        TokenFeatures(tmp_path / "tok", load_target(str(save_tiny_model(tmp_path / "other", seed=3))), "other")


def test_training_reads_several_token_datasets_as_one(tmp_path, tiny_dir, monkeypatch):
    """``--data GREEDY,SAMPLED``: the sequences of both, in that order, each computed as alone; the meta lists both
    datasets and their decodings. A list with a directory that is not a token dataset is refused by name."""
    from falconspec.models import load_target
    from falconspec.token_data import TokenFeatures
    from falconspec.train_common import TrainConfig, load_data

    src = write_convs(tmp_path / "c.json", 6)
    common = dict(model=str(tiny_dir), source=str(src), max_len=96, max_new_tokens=8, gen_dtype="float32",
                  shard_size=3, batch_size=3, split="all")
    greedy, sampled = str(tmp_path / "greedy"), str(tmp_path / "sampled")
    generate_token_dataset(TokenDataConfig(**common, out=greedy), progress=quiet)
    generate_token_dataset(TokenDataConfig(**common, out=sampled, temperature=1.0), progress=quiet)
    target = load_target(str(tiny_dir))
    one, two = TokenFeatures(greedy, target, str(tiny_dir), split="all"), TokenFeatures(sampled, target, str(tiny_dir),
                                                                                       split="all")
    import falconspec.token_data as token_data

    hashed = []
    monkeypatch.setattr(token_data, "weights_sha256", lambda model, real=token_data.weights_sha256:
                        hashed.append(1) or real(model))
    both = TokenFeatures(f"{greedy},{sampled}", target, str(tiny_dir), split="all")
    assert len(hashed) == 1, "the target is hashed once, whatever the number of datasets"
    assert both.ids == one.ids + two.ids and len(both) == 12
    assert torch.equal(both[7]["input_ids"], two[1]["input_ids"])
    assert [d["from_tokens"] for d in both.meta["datasets"]] == [greedy, sampled]
    assert both.meta["mode"] == ("self-distilled, every user turn; self-distilled, every user turn, sampled at "
                                 "temperature 1.0")
    assert both.meta["num_conversations"] == 12 and len(both.meta["token_shards"]) == 4
    import shutil

    other = shutil.copytree(sampled, tmp_path / "other-target")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["target"]["tokenizer_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="made by different targets"):
        TokenFeatures(f"{greedy},{other}", target, str(tiny_dir), split="all")
    (tmp_path / "features").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'features'} is not one"):
        load_data(TrainConfig(data=f"{greedy},{tmp_path / 'features'}", out="", model=str(tiny_dir)), target)


def test_a_view_of_the_first_shards_reads_exactly_them(tmp_path, tiny_dir):
    """recipes/token_subset.py: a manifest of a dataset's first N shards, its shards/ linked, read as a dataset."""
    token_subset = load_script("recipes/token_subset.py")
    src = write_convs(tmp_path / "c.json", 6, turns=2)
    cfg = TokenDataConfig(model=str(tiny_dir), source=str(src), out=str(tmp_path / "d"), split="all", max_len=200,
                          max_new_tokens=8, shard_size=2, batch_size=4, gen_dtype="float32")
    generate_token_dataset(cfg, progress=quiet)
    manifest = read_manifest(tmp_path / "d")
    totals = token_subset.write_view(tmp_path / "d", 2, tmp_path / "view", split="all")
    first = [c for shard in manifest["shards"][:2] for c in shard["conversations"]]
    seen = [s for _, shard in iter_token_samples(tmp_path / "view") for s in shard]
    assert [s.id for s in seen] == first and len(manifest["shards"]) == 3
    assert totals["all"]["answer_tokens"] == sum(s["answer_tokens"] for s in manifest["shards"][:2])
    assert (tmp_path / "view" / "shards").is_symlink()
    with pytest.raises(SystemExit, match="3 all shards below index 9, not 9"):
        token_subset.write_view(tmp_path / "d", 9, tmp_path / "view2", split="all")


def test_multi_layer_features_train_from_tokens_as_the_engine_supplies_them(tmp_path, tiny_dir):
    """``falconspec train --feature-layers``: each sample also holds those layers' inputs, exactly what the target
    gives the drafter at decoding time (``prefill`` with the drafter's ``feature_layers``); the trained drafter
    records them, a resume must keep them, and stored (last-layer) features are refused."""
    from falconspec.drafters.sar_model import SARDrafterModel
    from falconspec.models import load_target
    from falconspec.token_data import TokenFeatures
    from falconspec.train import train
    from falconspec.train_common import TrainConfig

    token_dataset_with_heldout(tmp_path / "tok", tiny_dir, train_limit=6)
    target = load_target(str(tiny_dir))
    plain = TokenFeatures(tmp_path / "tok", target, str(tiny_dir))[0]
    sample = TokenFeatures(tmp_path / "tok", target, str(tiny_dir), feature_layers=[1, 0], store_dtype="float32")[0]
    assert "layer_inputs" not in plain and torch.equal(sample["hidden_states"].half(), plain["hidden_states"])
    torch.testing.assert_close(sample["layer_inputs"], target.prefill(sample["input_ids"].long(), [1, 0]))

    def cfg(out, **changes):
        return TrainConfig(**{**dict(data=str(tmp_path / "tok"), eval_data=str(tmp_path / "tok"), out=str(out),
                                     model=str(tiny_dir), max_steps=3, eval_every=3, save_every=1, log_every=1,
                                     draft_vocab=20, lr=3e-3, warmup=1, batch_size=2, eval_samples=2, max_len=96,
                                     k=2, newest_pair=True, chain_slots=True, feature_layers="auto"), **changes})

    drafter = train(cfg(tmp_path / "run"))
    model = SARDrafterModel.from_pretrained(drafter, target)
    assert model.feature_layers == [0, 1], "'auto' on a 2-layer target: its first and last layer"
    recipe = json.loads((drafter / "recipe.json").read_text())
    assert recipe["data"]["feature_layers"] == [0, 1] and recipe["final"]["acc@1"] >= 0
    with pytest.raises(ValueError, match="reads target layers \\[0, 1\\].*pass --feature-layers 0,1"):
        train(cfg(tmp_path / "run", max_steps=4, feature_layers=""))
    last = train(cfg(tmp_path / "last", feature_layers="", max_steps=1, eval_every=1))
    with pytest.raises(ValueError, match="reads target layers last .after the final norm., not \\[0, 1\\]: pass no"):
        train(cfg(tmp_path / "grown", init_from=str(last)))
    grown = train(cfg(tmp_path / "grown", init_from=str(last), feature_layers="0,2", max_steps=1, eval_every=1))
    assert SARDrafterModel.from_pretrained(grown, target).feature_layers == [0, 2], "2: the last layer, kept"
    features_from_tokens(str(tmp_path / "tok"), str(tmp_path / "feat"), model=str(tiny_dir), split="train",
                         progress=quiet)
    with pytest.raises(ValueError, match="--feature-layers needs the target's layer inputs"):
        train(cfg(tmp_path / "stored", data=str(tmp_path / "feat"), eval_data=""))
    with pytest.raises(ValueError, match="--feature-layers gives a SAR drafter multi-layer features: it needs --kind sar"):
        cfg(tmp_path / "medusa", kind="medusa")
    with pytest.raises(ValueError, match="distinct target layer ids in \\[0, 2\\]"):
        train(cfg(tmp_path / "bad", feature_layers="0,5"))
    with pytest.raises(ValueError, match="--eval-data shares"):  # --eval-split all: every shard, the train split's too
        train(cfg(tmp_path / "all", eval_split="all"))
    with pytest.raises(ValueError, match="--eval-split must be heldout or all"):
        cfg(tmp_path / "all", eval_split="test")

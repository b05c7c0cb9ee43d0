"""The testbed: oracle properties, the chat template's prefix contract, generation, and a tiny build
(loadable folders, caching, atomic stages, bit-identical rebuilds)."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvkd.testbed import tasks
from tvkd.testbed.build import STAGES, TestbedConfig, build_testbed, read_jsonl, stage_keys
from tvkd.testbed.tokenizer import build_tokenizer

# ---------------------------------------------------------------------------------------------- oracle


def _problems(n: int, seed: int = 0) -> list[tasks.Problem]:
    rng = random.Random(seed)
    return [tasks.sample_problem(rng, num_symbols=10, min_len=3, max_len=10) for _ in range(n)]


def test_ideal_answers():
    assert tasks.score("sort : c a b", "a b c") == 1.0
    assert tasks.parse_prompt("reverse : c a b").ideal() == ["b", "a", "c"]
    assert tasks.parse_prompt("dedupe : c a c b a").ideal() == ["c", "a", "b"]
    assert tasks.parse_prompt("count : a b a").ideal() == ["3"]


def test_oracle_reads_the_prompt_text_in_any_wrapping():
    rendered = "<bos> <user> sort : c a b <eot> <assistant>"
    two_turn = "<bos> <user> reverse : a b <eot> <assistant> b a <eot> <user> sort : c a b <eot> <assistant>"
    for prompt in ("sort : c a b", rendered, two_turn):
        assert tasks.score(prompt, "a b c") == 1.0
        assert tasks.exact_match(prompt, "a b c <eot> junk after the turn")


def test_oracle_values():
    assert tasks.score("sort : c a b", "") == 0.0
    assert tasks.score("sort : c a b", "a b c c") == pytest.approx(1 - 1 / 4)  # the flaw costs one word
    assert tasks.score("sort : c a b", "a c") == pytest.approx(1 - 1 / 3)
    assert tasks.score("count : a b a", "3 3") == pytest.approx(0.5)
    assert not tasks.exact_match("sort : c a b", "a b c c")


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    words=st.lists(st.sampled_from(list("abcdefghij") + ["3", "<eot>"]), max_size=14),
)
def test_oracle_is_bounded_and_maximal_only_at_the_ideal(seed, words):
    (problem,) = _problems(1, seed)
    response = " ".join(words)
    r = tasks.score(problem.text, response)
    assert 0.0 <= r <= 1.0
    assert (r == 1.0) == (tasks.response_words(response) == problem.ideal())


def test_flaw_detection():
    assert tasks.has_flaw("sort : c a b", "a b c c")
    assert not tasks.has_flaw("sort : c a b", "a b c")
    assert not tasks.has_flaw("sort : c c a", "a c c")  # the ideal itself ends in a repeat
    assert tasks.has_flaw("sort : c c a", "a c c c")
    assert tasks.add_flaw(["a", "b"]) == ["a", "b", "b"]
    for p in _problems(50):
        assert tasks.has_flaw(p.text, " ".join(tasks.add_flaw(p.ideal())))


def test_bad_prompts_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.parse_prompt("shuffle : a b")
    with pytest.raises(ValueError, match="not a testbed prompt"):
        tasks.parse_prompt("hello world")


def test_summarize():
    prompts = ["sort : c a b", "reverse : a b", "count : a a"]
    m = tasks.summarize(prompts, ["a b c", "b a a", "2"])
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["flaw_rate"] == pytest.approx(1 / 3)
    assert m["longer_than_ideal"] == pytest.approx(1 / 3)
    assert set(m["oracle_by_task"]) == {"sort", "reverse", "count"}


# ----------------------------------------------------------------------------------- tokenizer/template


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(num_symbols=10, max_len=10).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))  # the saved-and-loaded one, as every stage uses


def _ids(tokenizer, messages, **kw):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def test_special_tokens(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<bos>", "<eot>")
    assert tokenizer.pad_token_id == 0
    assert tokenizer.convert_tokens_to_ids("<user>") != tokenizer.unk_token_id
    assert tokenizer.convert_tokens_to_ids("<assistant>") != tokenizer.unk_token_id


def test_generation_prompt_is_a_prefix_and_the_turn_ends_in_exactly_eos(tokenizer):
    for p in _problems(200):
        for history in (
            [],
            [{"role": "user", "content": "reverse : a b"}, {"role": "assistant", "content": "b a"}],
        ):
            prompt = [*history, {"role": "user", "content": p.text}]
            answer = " ".join(p.ideal())
            prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
            full_ids = _ids(tokenizer, prompt + [{"role": "assistant", "content": answer}])
            assert full_ids[: len(prompt_ids)] == prompt_ids
            response = full_ids[len(prompt_ids) :]
            assert response == tokenizer(answer, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            assert tokenizer.decode(response, skip_special_tokens=True) == answer


def test_assistant_mask_and_terminal_state_training(tokenizer):
    from tvkd.testbed.train import sft_features

    messages = [
        {"role": "user", "content": "sort : b a"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "count : a"},
        {"role": "assistant", "content": "1"},
    ]
    f = sft_features(tokenizer, messages)
    trained = tokenizer.convert_ids_to_tokens([i for i, m in zip(f["input_ids"], f["assistant_masks"]) if m])
    # both answers with their <eot>, and the <user> that follows the first ended turn (the post-EOS state)
    assert trained == ["a", "b", "<eot>", "<user>", "1", "<eot>"]


def test_unknown_role_is_refused(tokenizer):
    with pytest.raises(Exception, match="system"):
        _ids(tokenizer, [{"role": "system", "content": "x"}, {"role": "user", "content": "sort : a"}])


# ----------------------------------------------------------------------------------------- generation


def test_generate_shapes_order_and_seed(tokenizer):
    from tvkd.generation import generate
    from tvkd.testbed import models

    model = models.init_model(models.STUDENT, tokenizer, seed=0)
    prompts = [[{"role": "user", "content": p.text}] for p in _problems(7)]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert len(greedy) == 7 and all(len(g) == 1 for g in greedy)
    one_by_one = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts[:3]]
    assert one_by_one == greedy[:3]
    a = generate(model, tokenizer, prompts, max_new_tokens=6, do_sample=True, num_return_sequences=4, seed=1)
    b = generate(model, tokenizer, prompts, max_new_tokens=6, do_sample=True, num_return_sequences=4, seed=1)
    assert a == b and all(len(x) == 4 for x in a)
    assert all("<eot>" not in s and "<pad>" not in s for x in a for s in x)
    with pytest.raises(ValueError, match="do_sample"):
        generate(model, tokenizer, prompts, max_new_tokens=2, num_return_sequences=2)


# -------------------------------------------------------------------------------------------- build

TINY = TestbedConfig(
    num_sft=96,
    num_pref_train=48,
    num_pref_test=16,
    num_test=32,
    teacher_layers=1,
    teacher_hidden=32,
    teacher_heads=2,
    teacher_intermediate=64,
    student_layers=1,
    student_hidden=16,
    student_heads=2,
    student_intermediate=32,
    teacher_sft_epochs=1,
    student_sft_epochs=1,
    sft_batch_size=32,
    dpo_epochs=1,
    student_dpo_epochs=1,
    dpo_batch_size=16,
    dpo_warmup_steps=1,
    max_new_tokens=8,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_testbed(TINY, cache_dir=tmp_path_factory.mktemp("testbed"), progress=False)


def test_config_fields_document_themselves():
    for f in dataclasses.fields(TestbedConfig):
        assert f.metadata["help"], f.name
        assert f.metadata["stages"] or not f.metadata["fingerprinted"], f"{f.name} reaches no stage key"
        assert set(f.metadata["stages"]) <= set(STAGES), f.name


def test_stage_keys_follow_their_inputs():
    base = stage_keys(TINY)
    dpo_only = stage_keys(dataclasses.replace(TINY, dpo_lr=1e-4))
    assert {s for s in STAGES if base[s] != dpo_only[s]} == {"teacher_dpo"}
    student_only = stage_keys(dataclasses.replace(TINY, student_hidden=32))
    assert {s for s in STAGES if base[s] != student_only[s]} == {
        "student_sft",
        "student_pairs",
        "student_dpo",
    }
    assert stage_keys(dataclasses.replace(TINY, num_threads=1)) == base
    assert all(base[s] != stage_keys(dataclasses.replace(TINY, seed=1))[s] for s in STAGES)


def test_model_folders_load_like_hub_models(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in (
        built.teacher_sft_dir,
        built.teacher_dpo_dir,
        built.student_sft_dir,
        built.student_dpo_dir,
    ):
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin")) and not (folder / "trainer").exists()
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert model.config.vocab_size == len(tok)
        assert model.config.eos_token_id == tok.eos_token_id
        ids = torch.tensor(
            [_ids(tok, [{"role": "user", "content": "sort : b a"}], add_generation_prompt=True)]
        )
        assert torch.isfinite(model(ids).logits).all()
    teacher = AutoModelForCausalLM.from_pretrained(str(built.teacher_sft_dir))
    student = AutoModelForCausalLM.from_pretrained(str(built.student_sft_dir))
    assert teacher.num_parameters() > student.num_parameters()
    assert AutoTokenizer.from_pretrained(str(built.tokenizer_dir)).chat_template


def test_data_files_follow_the_schema(built):
    for path in (built.pref_train, built.pref_test, built.student_pref_train, built.student_pref_test):
        rows = read_jsonl(path)
        assert rows
        for row in rows:
            assert set(row) == {"id", "prompt", "chosen", "rejected", "meta"}
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
            meta = row["meta"]
            assert meta["oracle_chosen"] == tasks.score(
                row["prompt"][0]["content"], row["chosen"][0]["content"]
            )
            assert meta["oracle_rejected"] == tasks.score(
                row["prompt"][0]["content"], row["rejected"][0]["content"]
            )
            assert meta["oracle_chosen"] != meta["oracle_rejected"]
            assert meta["label_flipped"] == (meta["oracle_chosen"] < meta["oracle_rejected"])
    sft = read_jsonl(built.sft_train)
    assert len(sft) == TINY.num_sft
    assert all(set(r) == {"id", "messages", "meta"} and r["messages"][-1]["role"] == "assistant" for r in sft)
    assert any(len(r["messages"]) == 4 for r in sft)  # some two-turn conversations
    test = read_jsonl(built.test_prompts)
    assert len(test) == TINY.num_test and all(set(r) == {"id", "prompt", "meta"} for r in test)


def test_prompt_sets_are_disjoint(built):
    def texts(path, key="prompt"):
        return {m["content"] for r in read_jsonl(path) for m in r[key] if m["role"] == "user"}

    test, train = texts(built.test_prompts), texts(built.pref_train)
    sft = texts(built.sft_train, key="messages")
    assert not test & train and not test & sft and not train & sft
    assert not texts(built.pref_test) & (train | sft | test)


def test_report(built):
    report = json.loads(built.report_path.read_text())
    assert report == json.loads(json.dumps(built.report))
    assert set(report["stages"]) == set(STAGES)
    for stage in ("teacher_sft", "teacher_dpo", "student_sft", "student_dpo"):
        ev = report["stages"][stage]["eval"]
        assert 0 <= ev["oracle"] <= 1 and 0 <= ev["flaw_rate"] <= 1 and ev["n"] == TINY.num_test
    assert 0 <= report["label_noise"]["teacher_pairs"] <= 1
    assert report["seed"] == TINY.seed and report["config_fingerprint"] == TINY.fingerprint()
    assert all(report["stages"][s]["wall_s"] >= 0 for s in STAGES)


def test_a_second_build_is_cached(built):
    stamps = {s: (d / "stage.json").stat().st_mtime_ns for s, d in built.stage_dirs.items()}
    start = time.perf_counter()
    again = build_testbed(TINY, cache_dir=built.cache_dir, progress=False)
    assert time.perf_counter() - start < 10
    assert all(again.report["stages"][s]["cached"] for s in STAGES)
    assert {s: (d / "stage.json").stat().st_mtime_ns for s, d in again.stage_dirs.items()} == stamps


def test_same_seed_gives_bit_identical_data_and_weights(built, tmp_path, capfd):
    capfd.readouterr()
    twin = build_testbed(TINY, cache_dir=tmp_path, progress=False)
    assert capfd.readouterr() == ("", "")  # without progress a build prints nothing
    for stage in STAGES:
        ours = json.loads((built.stage_dirs[stage] / "stage.json").read_text())["files"]
        theirs = json.loads((twin.stage_dirs[stage] / "stage.json").read_text())["files"]
        assert ours == theirs, stage  # sha256 of every file: weights, JSONL, tokenizer, greedy outputs
    assert (built.teacher_dpo_dir / "model.safetensors").read_bytes() == (
        twin.teacher_dpo_dir / "model.safetensors"
    ).read_bytes()


def test_a_failed_stage_leaves_nothing_that_looks_finished(built, tmp_path, monkeypatch):
    import tvkd.testbed.pairs as pairs

    root = tmp_path / "cache"
    for stage in ("data", "teacher_sft"):  # reuse the finished upstream stages
        src = built.stage_dirs[stage]
        import shutil

        shutil.copytree(src, root / src.name)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-stage")

    monkeypatch.setattr(pairs, "pair_stats", killed)
    with pytest.raises(KeyboardInterrupt):
        build_testbed(TINY, cache_dir=root, progress=False)
    assert sorted(p.name.split("-")[0] for p in root.iterdir() if p.name != ".locks") == [
        "data",
        "teacher_sft",
    ]  # no temp, no half stage


def test_a_killed_builds_leftovers_are_swept(tmp_path):
    from tvkd.storage import _host, remove_stale_temps

    stale = tmp_path / f".teacher_sft-abc.tmp-{_host()}-999999999-xyz"
    (stale / "trainer").mkdir(parents=True)
    remove_stale_temps(Path(tmp_path))
    assert not stale.exists()


# ------------------------------------------------------------------------------------------- progress

_ESTIMATED = re.compile(r"building, estimated \d+(\.\d)? s|building, estimated \d+ min \d\d s")


def test_a_build_names_its_stage_on_every_line_and_bar(built, tmp_path, capfd):
    import io
    import shutil

    from tqdm import std, tqdm

    root = tmp_path / "cache"
    for stage in ("data", "teacher_sft"):  # two cached stages, five built ones
        shutil.copytree(built.stage_dirs[stage], root / built.stage_dirs[stage].name)
    hook_free = std.tqdm.__dict__["__init__"]
    capfd.readouterr()
    build_testbed(TINY, cache_dir=root, progress=True)
    err = capfd.readouterr().err  # lines and bars; stdout holds only the trainers' loss logs
    labels = [f"testbed stage {k}/7 {name}" for k, name in enumerate(STAGES, 1)]
    positions = [err.find(label) for label in labels]
    assert -1 not in positions and positions == sorted(positions), positions

    lines = [seg.strip() for seg in re.split(r"[\r\n]", err) if seg.strip()]
    assert re.fullmatch(r"testbed: 5 of 7 stages to build, estimated .+ s in all", lines[0]), lines[0]
    for label, name in zip(labels, STAGES):
        mine = [line for line in lines if line.startswith(label + ":") and "%|" not in line]
        if name in ("data", "teacher_sft"):
            assert mine == [f"{label}: cached   {root.resolve() / built.stage_dirs[name].name}"], mine
        else:
            assert len(mine) == 2, mine
            assert _ESTIMATED.search(mine[0]), mine[0]  # before: the estimate and the work it counts
            assert re.search(r": built in .+ s \(estimated .+ s\)   ", mine[1]), mine[1]  # after: actual
    bars = [line for line in lines if "%|" in line]
    assert bars and all(line.startswith("testbed stage ") for line in bars), bars
    assert any(line.startswith("testbed stage 3/7 teacher_pairs: sampling train") for line in bars)
    assert any(line.startswith("testbed stage 4/7 teacher_dpo: training") for line in bars)
    assert any(line.startswith("testbed stage 6/7 student_pairs: sampling test") for line in bars)
    assert any(
        line.startswith("testbed stage 7/7 student_dpo: Computing reference log probs") for line in bars
    )
    assert lines[-1].startswith("testbed: ready in ")

    # the labels are gone after the build, and progress changed nothing that was built
    assert std.tqdm.__dict__["__init__"] is hook_free
    with tqdm(total=1, desc="after", file=io.StringIO()) as bar:
        assert bar.desc == "after"
    for stage in STAGES[2:]:
        ours = json.loads((built.stage_dirs[stage] / "stage.json").read_text())["files"]
        theirs = json.loads((root / built.stage_dirs[stage].name / "stage.json").read_text())["files"]
        assert ours == theirs, stage


def test_estimates_follow_the_work(built):
    from tvkd.testbed.progress import estimate_build, estimate_stage, model_parameters

    for role in ("teacher", "student"):  # the parameter count the costs scale with is the model's
        assert model_parameters(TINY, role) == built.report["stages"][f"{role}_sft"]["parameters"]
    base = TestbedConfig()
    assert model_parameters(base, "teacher") == 664_704 and model_parameters(base, "student") == 86_336

    def sec(cfg, stage):
        return estimate_stage(cfg, stage, trl_imported=True)[0]

    more = dataclasses.replace(
        base, num_sft=8000, teacher_sft_epochs=16, samples_per_prompt=8, num_pref_train=8000, num_test=2000
    )
    for stage in STAGES:
        assert 0 < sec(base, stage) < sec(more, stage), stage
    assert sec(base, "teacher_sft") > sec(base, "student_sft")
    assert sec(base, "teacher_pairs") > sec(base, "student_pairs")
    assert sec(base, "teacher_dpo") > sec(base, "student_dpo")
    assert estimate_stage(base, "teacher_sft", trl_imported=False)[0] > sec(base, "teacher_sft")
    total = estimate_build(base, STAGES)
    assert 60 < total < 600  # the default build: about 3 minutes on 2 cores, one thread
    assert total < sum(estimate_stage(base, s, trl_imported=False)[0] for s in STAGES)  # TRL imported once
    assert sum(sec(TINY, s) for s in STAGES) < 5


def test_oracle_relabelled_pairs_order_every_pair_by_the_oracle(tmp_path):
    """The ceiling control's pairs: a flipped label is swapped back, a right one and a tie stay; the file is
    derived once per content of its source."""
    from tvkd.testbed.build import oracle_relabelled, write_jsonl

    def pair(chosen, rejected, a, b):
        return {"prompt": [{"role": "user", "content": "sort : b a"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "meta": {"oracle_chosen": a, "oracle_rejected": b, "label_flipped": a < b, "task": "sort"}}

    source = tmp_path / "student_pref_train.jsonl"
    write_jsonl(source, [pair("b a", "a b", 0.0, 1.0), pair("a b", "a", 1.0, 0.5), pair("a a", "b b", 0.5, 0.5)])
    out = oracle_relabelled(source, tmp_path / "derived")
    rows = read_jsonl(out)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("a b", "b a"), ("a b", "a"), ("a a", "b b")]
    assert [(r["meta"]["oracle_chosen"], r["meta"]["oracle_rejected"]) for r in rows] == [
        (1.0, 0.0), (1.0, 0.5), (0.5, 0.5)]
    assert not any(r["meta"]["label_flipped"] for r in rows) and rows[0]["prompt"] == read_jsonl(source)[0]["prompt"]
    assert oracle_relabelled(source, tmp_path / "derived") == out  # reused
    write_jsonl(source, [pair("b a", "a b", 0.0, 1.0)])
    assert oracle_relabelled(source, tmp_path / "derived") != out  # new content, new file
    bare = tmp_path / "bare.jsonl"
    write_jsonl(bare, [{"chosen": [], "rejected": [], "meta": {}}])
    with pytest.raises(ValueError, match="cannot be relabelled"):
        oracle_relabelled(bare, tmp_path / "derived")

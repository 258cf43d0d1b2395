"""The CPU search task: a deterministic corpus, disjoint splits, answers reachable only through the
tool, every name retrievable by BM25, gold trajectories equal to what SearchEnv returns from the real
server, and their length with the tiny tokenizer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from skyrl_mtp.data.search_task import RESERVED, SearchTask, guessed_answer_trajectory, search_sft_trajectory
from skyrl_mtp.envs import SearchEnv
from skyrl_mtp.envs.retrieval import RetrievalClient, load_corpus

REPO = Path(__file__).resolve().parents[2]


def test_corpus_is_deterministic_and_well_formed(task):
    assert SearchTask().corpus() == task.corpus()
    assert SearchTask(seed=1).corpus() != task.corpus()
    facts = task.facts()
    names, codes = [n for n, _ in facts], [c for _, c in facts]
    assert len(facts) == 400 and len(set(names)) == 400 and len(set(codes)) == 400
    for name, code in facts:
        assert re.fullmatch(r"([bdfgklmnprstvz][aeiou]){2}", name) and name not in RESERVED
        assert re.fullmatch(r"[0-9]{4}", code)
    assert task.corpus()[0] == {"id": f"code-{names[0]}", "contents": f"the code of {names[0]} is {codes[0]}"}
    assert [d["id"] for d in SearchTask(num_names=50, code_digits=3).corpus()] != []
    with pytest.raises(ValueError, match="num_names must be in 1..1000"):
        SearchTask(num_names=1001, code_digits=3)


def test_splits_are_disjoint_deterministic_and_cover_the_corpus(task):
    train, evals = task.examples("train"), task.examples("eval")
    assert task.examples("train") == train
    train_names = {ex["extra"]["name"] for ex in train}
    eval_names = {ex["extra"]["name"] for ex in evals}
    assert not train_names & eval_names
    assert train_names | eval_names == {n for n, _ in task.facts()}
    assert 20 <= len(evals) <= 60  # ~10 of 100 hash buckets
    assert all(task.split_of(n) == "eval" for n in eval_names)
    # the split of a name does not depend on the seed: a name is eval in every corpus that has it
    other = SearchTask(seed=5)
    assert {ex["extra"]["name"] for ex in other.examples("eval")} & train_names == set()
    ex = train[2]
    assert ex == {"prompt": f"Q code of {ex['extra']['name']} ? A", "answer": dict(task.facts())[ex["extra"]["name"]],
                  "extra": {"task": "search", "name": ex["extra"]["name"], "split": "train", "index": 2}}
    assert task.examples("eval", n=5) == evals[:5]
    with pytest.raises(ValueError, match=f"the eval split of this task has {len(evals)} examples"):
        task.examples("eval", n=len(evals) + 1)
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        task.examples("test")


def test_answers_are_reachable_only_through_the_corpus(task):
    corpus_text = [d["contents"] for d in task.corpus()]
    for ex in task.examples("train") + task.examples("eval"):
        assert not re.search(r"[0-9]", ex["prompt"])
        holders = [t for t in corpus_text if ex["answer"] in t]
        assert holders == [f"the code of {ex['extra']['name']} is {ex['answer']}"]


def test_every_name_is_retrieved_first_by_bm25(task):
    index = task.index()
    names = [n for n, _ in task.facts()]
    by_name = index.search(names, topk=3)
    with_words = index.search([f"code of {n}" for n in names], topk=3)
    for (name, code), only, ranked in zip(task.facts(), by_name, with_words):
        fact = f"the code of {name} is {code}"
        assert [it["document"]["contents"] for it in only] == [fact]  # no other document shares the name
        assert ranked[0]["document"]["contents"] == fact and ranked[0]["score"] > ranked[1]["score"]


def test_gold_trajectories_match_search_env_over_the_real_server(task, server):
    client = RetrievalClient(server.url, 5.0)
    env = SearchEnv(client, topk=3)
    for ex in task.examples("train") + task.examples("eval"):
        gold = search_sft_trajectory(ex, client)  # default topk: env.topk's default
        (turn1, obs1), (turn2, obs2) = gold
        name, code = ex["extra"]["name"], ex["answer"]
        assert turn1 == f"<search>{name}</search>" and turn2 == f"<answer>{code}</answer>" and obs2 == ""
        env.reset(ex)
        first = env.step(turn1)
        assert first.observation == obs1 and not first.done and first.info["tool_errors"] == 0
        last = env.step(turn2)
        assert last.done and last.reward == 1.0 and last.observation == obs2
    # the in-process index gives the same trajectories as the server
    assert task.sft_trajectories(split="eval") == [(ex["prompt"], search_sft_trajectory(ex, client.search))
                                                    for ex in task.examples("eval")]


def test_gold_trajectory_refuses_a_lookup_over_another_corpus(task):
    ex = task.examples("train")[0]
    with pytest.raises(ValueError, match=r"do not hold its fact .*same seed"):
        search_sft_trajectory(ex, SearchTask(seed=1, num_names=10).index())
    with pytest.raises(ValueError, match="not a search-task example"):
        search_sft_trajectory({"prompt": "sort 12 :", "answer": "12", "extra": {"task": "sort"}}, task.index())


def test_tool_share_mixes_gold_and_guessed_trajectories(task):
    index = task.index()
    gold = {prompt: turns for prompt, turns in task.sft_trajectories(index)}
    mixed = task.sft_trajectories(index, tool_share=0.3, passes=20, seed=7)
    assert len(mixed) == 20 * len(gold)
    searched = [turns == gold[prompt] for prompt, turns in mixed]
    # 0.3 of 20 x 360 draws: the binomial standard deviation is ~0.005
    assert abs(sum(searched) / len(searched) - 0.3) < 0.025
    codes = []
    for (prompt, turns), used_tool in zip(mixed, searched):
        if not used_tool:
            assert len(turns) == 1 and turns[0][1] == ""
            match = re.fullmatch(r"<answer>(\d{4})</answer>", turns[0][0])
            assert match, turns
            codes.append(match.group(1))
    # guesses are uniform over the 10^4 codes (a guess is right by chance only): as many distinct
    # codes as n uniform draws give, 10^4 (1 - (1 - 10^-4)^n), within ~5 standard deviations ...
    expected_distinct = 1e4 * (1 - (1 - 1e-4) ** len(codes))
    assert abs(len(set(codes)) - expected_distinct) < 150, (len(set(codes)), expected_distinct)
    # ... and a name's draw changes from pass to pass (nothing to memorise per name)
    first_pass = searched[:len(gold)]
    assert first_pass != searched[len(gold):2 * len(gold)]
    assert task.sft_trajectories(index, tool_share=0.3, passes=20, seed=7) == mixed
    assert task.sft_trajectories(index, tool_share=0.3, passes=20, seed=8) != mixed
    with pytest.raises(ValueError, match="tool_share must be in"):
        task.sft_trajectories(index, tool_share=1.5)


def test_guessed_answer_has_the_task_code_width():
    import random

    turns = guessed_answer_trajectory(6, random.Random(0))
    assert re.fullmatch(r"<answer>\d{6}</answer>", turns[0][0]) and turns[0][1] == ""


def test_token_counts_with_the_tiny_tokenizer(task, tmp_path):
    """Whole episodes fit the CPU demo's max_model_len (256) with room to spare, and turns and
    observations tokenize the same apart as together (token-level concatenation is faithful)."""
    from transformers import AutoTokenizer

    from skyrl_mtp.models.tokenizer import save_tiny_tokenizer

    save_tiny_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    totals = []
    for prompt, gold in task.sft_trajectories(split="train") + task.sft_trajectories(split="eval"):
        pieces = [prompt] + [text for turn in gold for text in turn if text]
        ids = [tok.encode(p, add_special_tokens=False) for p in pieces]
        assert tok.encode("".join(pieces), add_special_tokens=False) == [i for piece in ids for i in piece]
        assert tok.decode([i for piece in ids for i in piece]) == "".join(pieces)
        totals.append(sum(map(len, ids)) + 1)  # + eos after the answer
    assert max(totals) <= 110, max(totals)
    prompt, gold = task.sft_trajectories(split="train")[0]
    counts = [len(tok.encode(t, add_special_tokens=False)) for t in (prompt, gold[0][0], gold[0][1], gold[1][0])]
    print(f"\ntokens of {prompt!r}: prompt/search/observation/answer = {counts}, total with eos {sum(counts) + 1}; "
          f"over all {len(totals)} episodes min {min(totals)} max {max(totals)}")


def test_cli_writes_the_corpus(task, tmp_path):
    out = tmp_path / "search_corpus.jsonl"
    proc = subprocess.run([sys.executable, "-m", "skyrl_mtp.data.search_task", "--write-corpus", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert load_corpus(out) == task.corpus()

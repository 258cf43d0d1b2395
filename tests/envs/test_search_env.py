"""SearchEnv against the real retrieval server on loopback: searches, exact-match reward, parse
errors, and tool errors (server down, hung server) that fail the step cleanly and let the episode go on."""

from __future__ import annotations

import socket
import time

import pytest

from skyrl_mtp.config.schema import EnvConfig
from skyrl_mtp.envs import EnvStep, SearchEnv, get_env, search_exact_reward
from skyrl_mtp.envs.retrieval import RetrievalClient
from skyrl_mtp.envs.search import parse_action
from skyrl_mtp.rewards import get_reward

COUNTERS = {"tool_calls", "tool_errors", "parse_errors"}


@pytest.fixture
def env(server):
    return get_env("search")(EnvConfig(name="search"), RetrievalClient(server.url, 5.0))


def _example(task, i=0):
    return task.examples("train")[i]


def _info(**nonzero):
    return {k: float(nonzero.get(k, 0.0)) for k in COUNTERS}


def test_search_then_exact_answer(env, task):
    ex = _example(task, 3)
    name, code = ex["extra"]["name"], ex["answer"]
    assert env.stop == ("</search>", "</answer>")
    env.reset(ex)
    step = env.step(f"let me look it up <search> {name} </search>")
    assert step == EnvStep(f"<information>the code of {name} is {code}</information>", 0.0, False,
                           _info(tool_calls=1))
    step = env.step(f"<answer> {code}\n</answer>")
    assert step == EnvStep("", 1.0, True, _info())
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("<answer>1</answer>")


def test_wrong_answer_scores_zero_and_reset_starts_over(env, task):
    ex = _example(task, 4)
    env.reset(ex)
    wrong = str((int(ex["answer"]) + 1) % 10 ** len(ex["answer"])).zfill(len(ex["answer"]))
    assert env.step(f"<answer>{wrong}</answer>") == EnvStep("", 0.0, True, _info())
    env.reset(ex)
    assert env.step(f"<answer>{ex['answer']}0</answer>").reward == 0.0  # exact, not a prefix
    env.reset(ex)
    assert env.step(f"<answer>{ex['answer']}</answer>").reward == 1.0


def test_multi_document_observation_and_no_results(env, task):
    ex = _example(task)
    env.reset(ex)
    name, code = ex["extra"]["name"], ex["answer"]
    obs = env.step(f"<search>code of {name}</search>").observation
    lines = obs.removeprefix("<information>").removesuffix("</information>").split("\n")
    assert len(lines) == 3 and lines[0] == f"the code of {name} is {code}"  # the name outranks common words
    assert all(line.startswith("the code of ") for line in lines)
    step = env.step("<search>zzzz</search>")
    assert step == EnvStep("<information>no results</information>", 0.0, False, _info(tool_calls=1))


@pytest.mark.parametrize("text, why", [
    ("I think the answer is 1234", "no </search> or </answer> tag"),
    ("<search>kavo", "no </search> or </answer> tag"),
    ("kavo</search>", "</search> without <search>"),
    ("<answer>kavo</search>", "</search> without <search>"),
    ("<search>kavo<answer>1</search>", "</search> without <search>"),
    ("<search>   </search>", "empty search query"),
    ("<answer></answer>", "empty answer"),
    ("", "no </search> or </answer> tag"),
])
def test_malformed_turns_are_parse_errors(env, task, text, why):
    env.reset(_example(task))
    step = env.step(text)
    assert step == EnvStep(f"<information>error: {why}</information>", 0.0, False, _info(parse_errors=1))
    # the episode goes on
    assert env.step(f"<answer>{_example(task)['answer']}</answer>").reward == 1.0


def test_parse_action_takes_the_first_closing_tag():
    assert parse_action("<search>a</search><answer>b</answer>") == ("search", "a")
    assert parse_action("think <search>x</search> <search>y</search>") == ("search", "x")
    assert parse_action("<search>draft <search>final</search>") == ("search", "final")
    assert parse_action("<search>abandoned <answer>42</answer>") == ("answer", "42")
    assert parse_action("<answer>multi\nline</answer> trailing") == ("answer", "multi\nline")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_server_down_is_a_tool_error_and_the_episode_continues(task):
    cfg = EnvConfig(name="search", retrieval_url=f"http://127.0.0.1:{_closed_port()}", timeout_s=2.0)
    env = get_env("search")(cfg, None)  # joins the (absent) server by URL
    ex = _example(task)
    env.reset(ex)
    step = env.step(f"<search>{ex['extra']['name']}</search>")
    assert step == EnvStep("<information>error: search failed (unavailable)</information>", 0.0, False,
                           _info(tool_calls=1, tool_errors=1))
    assert "connection refused" in env.last_error
    assert env.step(f"<answer>{ex['answer']}</answer>") == EnvStep("", 1.0, True, _info())


def test_hung_server_times_out_within_timeout(task):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # accepts into the backlog, never answers
    try:
        cfg = EnvConfig(name="search", retrieval_url=f"http://127.0.0.1:{hung.getsockname()[1]}", timeout_s=1.0)
        env = get_env("search")(cfg, None)
        env.reset(_example(task))
        start = time.perf_counter()
        step = env.step("<search>anything</search>")
        elapsed = time.perf_counter() - start
    finally:
        hung.close()
    assert step == EnvStep("<information>error: search failed (timeout)</information>", 0.0, False,
                           _info(tool_calls=1, tool_errors=1))
    assert 0.95 <= elapsed < 1.0 + 0.5
    assert "RetrievalTimeout" in env.last_error


def test_in_process_index_gives_the_same_observations(env, task):
    local = SearchEnv(task.index(), topk=3)
    for ex in task.examples("eval")[:10]:
        for query in (ex["extra"]["name"], f"code of {ex['extra']['name']}"):
            env.reset(ex)
            local.reset(ex)
            assert local.step(f"<search>{query}</search>") == env.step(f"<search>{query}</search>")


def test_reset_and_step_misuse():
    with pytest.raises(TypeError, match="needs a retriever with search"):
        SearchEnv(object())
    with pytest.raises(ValueError, match="topk must be an integer >= 1"):
        SearchEnv(RetrievalClient("http://127.0.0.1:1", 1.0), topk=0)
    env = SearchEnv(RetrievalClient("http://127.0.0.1:1", 1.0))
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("<answer>1</answer>")
    with pytest.raises(ValueError, match="needs a non-empty 'answer'"):
        env.reset({"prompt": "p", "answer": " ", "extra": {}})


def test_search_exact_reward_agrees_with_the_env(env, task):
    assert get_reward("search_exact") is search_exact_reward
    ex = _example(task, 1)
    name, code = ex["extra"]["name"], ex["answer"]
    for final in (f"<answer>{code}</answer>", f"<answer> {code} </answer>", "<answer>0</answer>",
                  f"<answer>{code}1</answer>"):
        env.reset(ex)
        obs = env.step(f"<search>{name}</search>").observation
        last = env.step(final)
        text = f"<search>{name}</search>{obs}{final}"
        assert search_exact_reward(text, code) == last.reward
    assert search_exact_reward(f"the code is {code}", code) == 0.0  # no answer tag, no reward


def test_partial_credit_scores_matching_positions():
    from skyrl_mtp.envs.search import answer_score

    assert answer_score(" 1553 ", "1553") == 1.0 and answer_score("1553", "1553", True) == 1.0
    assert answer_score("1503", "1553") == 0.0  # exact match only by default
    assert answer_score("1503", "1553", partial_credit=True) == 0.75  # 3 of 4 positions
    assert answer_score("15", "1553", partial_credit=True) == 0.5  # too short: over the longer length
    assert answer_score("155390", "1553", partial_credit=True) == 4 / 6  # too long
    assert answer_score("", "1553", partial_credit=True) == 0.0

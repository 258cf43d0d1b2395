"""Reward registry and the built-in rewards (sort, math via math-verify, exact_match)."""

from __future__ import annotations

import threading

import pytest

from skyrl_mtp.rewards import extract_final_answer, get_reward, known_rewards, list_rewards, register_reward
from skyrl_mtp.rewards import registry


def test_builtins_are_registered():
    assert {"sort", "math", "exact_match"} <= set(list_rewards())
    assert known_rewards() == list_rewards()
    assert get_reward("sort")(" 0123", "0123") == 1.0
    assert get_reward("sort")(" 0124", "0123", task="sort", digits="3210") == 0.75  # extra kwargs ignored


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*'exact_match'.*'math'.*'sort'"):
        get_reward("nope")


def test_register_custom_and_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "_REWARDS", dict(registry._REWARDS))

    @register_reward("length")
    def length_reward(response_text: str, answer: str, **extra) -> float:
        return float(len(response_text))

    assert get_reward("length")("abc", "") == 3.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length")(lambda r, a, **e: 0.0)
    register_reward("length", override=True)(lambda r, a, **e: 1.0)
    assert get_reward("length")("abc", "") == 1.0


@pytest.mark.parametrize("response, answer, expected", [
    (r"So the result is \boxed{\frac{1}{2}}.", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
    (r"\boxed{x^2 + 1}", "1 + x^2", 1.0),
    (r"\boxed{34}", "34", 1.0),
    (r"\boxed{35}", "34", 0.0),
    (r"First \boxed{3}, finally \boxed{5}", "5", 1.0),   # the last box counts
    (r"First \boxed{3}, finally \boxed{5}", "3", 0.0),
    ("Reasoning...\nAnswer: $\\frac{3}{4}$", "0.75", 1.0),  # DAPO's "Answer:" format
    ("Answer: 12", "12", 1.0),
    ("The answer is 12", "12", 0.0),                       # no final-answer marker
    (r"\boxed{12", "12", 0.0),                             # box cut off
    ("", "12", 0.0),
])
def test_math_reward(response, answer, expected):
    assert get_reward("math")(response, answer) == expected


def test_math_reward_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(get_reward("math")(r"\boxed{\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_extract_final_answer():
    assert extract_final_answer(r"a \boxed{\frac{1}{2}} b") == r"\frac{1}{2}"
    assert extract_final_answer(r"\fbox{7}") == "7"
    assert extract_final_answer("Answer: 3\nAnswer: 4") == "4"
    assert extract_final_answer("nothing") is None


def test_exact_match():
    em = get_reward("exact_match")
    assert em("  yes\n", "yes") == 1.0
    assert em("yes!", "yes") == 0.0
    assert em("4", 4) == 1.0

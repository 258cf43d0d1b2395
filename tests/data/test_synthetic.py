"""The synthetic sort task: determinism, disjoint splits, rewards, and tokenization with the real tokenizer."""

from __future__ import annotations

import pytest

from skyrl_mtp.data.synthetic import (
    SyntheticTask,
    make_prompt,
    make_split,
    parse_prompt,
    reference_response,
    sft_pairs,
    sort_reward,
)


def test_split_is_deterministic_and_well_formed():
    a = make_split(seed=3, n=50, split="train")
    b = make_split(seed=3, n=50, split="train")
    assert a == b
    assert make_split(seed=4, n=50) != a
    for ex in a:
        digits = ex["extra"]["digits"]
        assert 24 <= len(digits) <= 28 and digits.isdigit()
        assert ex["prompt"] == f"sort {digits} :"
        assert ex["answer"] == "".join(sorted(digits))
        assert ex["extra"]["split"] == "train"
    assert len({ex["prompt"] for ex in a}) == 50


def test_train_and_eval_never_overlap_across_seeds():
    train = {ex["prompt"] for seed in (0, 1) for ex in make_split(seed, 1500, "train")}
    evals = {ex["prompt"] for seed in (0, 1) for ex in make_split(seed, 300, "eval")}
    assert not train & evals
    task = SyntheticTask()
    assert all(task.split_of(parse_prompt(p)) == "eval" for p in evals)


def test_reference_response_and_sft_pairs():
    assert reference_response("sort 8310 :") == " 0138"
    pairs = sft_pairs(seed=0, n=5)
    assert len(pairs) == 5
    for prompt, response in pairs:
        assert response == " " + "".join(sorted(parse_prompt(prompt)))
        assert sort_reward(response, response.strip()) == 1.0


@pytest.mark.parametrize("response, answer, expected", [
    (" 0123", "0123", 1.0),
    ("0123\n", "0123", 1.0),      # surrounding whitespace ignored
    (" 0124", "0123", 3 / 4),     # one wrong digit
    (" 012", "0123", 3 / 4),      # too short: 3 matches over the longer length 4
    (" 01234", "0123", 4 / 5),    # too long: 4 matches over 5
    (" 1123", "0123", 3 / 4),
    (" 0 1 2 3", "0123", 1 / 7),  # spaces count as characters: only position 0 matches
    ("", "0123", 0.0),
    ("   ", "0123", 0.0),
    ("abcd", "0123", 0.0),
])
def test_sort_reward_partial_credit(response, answer, expected):
    assert sort_reward(response, answer) == pytest.approx(expected)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not a sort prompt"):
        parse_prompt("reverse 123 :")
    with pytest.raises(ValueError, match="digits"):
        make_prompt("12a")
    with pytest.raises(ValueError, match="split"):
        make_split(0, 3, split="test")
    with pytest.raises(ValueError, match="max_digits"):
        SyntheticTask(min_digits=10, max_digits=5)
    with pytest.raises(ValueError, match="answer is empty"):
        sort_reward(" 1", "")


def test_custom_lengths():
    task = SyntheticTask(min_digits=5, max_digits=5)
    assert all(len(ex["answer"]) == 5 for ex in task.make_split(0, 20))


def test_tokenization_with_the_real_tokenizer(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    eos = tok.eos_token_id
    assert eos == 2
    examples = make_split(0, 200, "train") + make_split(0, 50, "eval")
    for ex in examples:
        prompt, response = ex["prompt"], reference_response(ex["prompt"])
        p_ids = tok.encode(prompt, add_special_tokens=False)
        r_ids = tok.encode(response, add_special_tokens=False)
        # Response = "Ġ" then one token per digit; with eos it is at least 25 tokens.
        assert len(r_ids) == len(ex["answer"]) + 1 >= 25
        assert len(r_ids + [eos]) >= 26
        assert tok.convert_ids_to_tokens(r_ids[:2]) == ["Ġ", ex["answer"][0]]
        # Round trips, and prompt/response tokenize the same apart as together.
        assert tok.decode(p_ids) == prompt
        assert tok.decode(r_ids) == response
        assert tok.decode(r_ids + [eos], skip_special_tokens=True) == response
        assert tok.encode(prompt + response, add_special_tokens=False) == p_ids + r_ids
        assert tok.convert_ids_to_tokens(p_ids[:2]) == ["sort", "Ġ"]
        assert len(p_ids) == len(ex["extra"]["digits"]) + 4  # sort, Ġ, digits..., Ġ, :

"""Dataset loaders (JSONL / JSON / Parquet, bad inputs) and PromptDataset's seeded, resumable cursor."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skyrl_mtp.data.datasets import PromptDataset, load_examples, synthetic_examples

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+1?"}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_string_and_chat_prompts(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "2+2?", "answer": "4", "source": "toy"},
        {"prompt": MESSAGES, "answer": 2},
    ])
    examples = load_examples(path)
    assert examples[0] == {"prompt": "2+2?", "answer": "4", "extra": {"source": "toy"}}
    assert examples[1]["prompt"] == MESSAGES  # kept as messages: the caller applies the chat template
    assert examples[1]["answer"] == "2"  # numbers become strings


def test_jsonl_blank_lines_and_custom_keys(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"question": "q1", "solution": "a1"}, {"question": "q2", "solution": "a2"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")  # a blank line between
    examples = load_examples(path, prompt_key="question", answer_key="solution")
    assert [(e["prompt"], e["answer"]) for e in examples] == [("q1", "a1"), ("q2", "a2")]
    assert load_examples(path, prompt_key="question", answer_key="solution", max_examples=1) == examples[:1]


def test_parquet_dapo_layout_with_dotted_answer_key(tmp_path):
    # DAPO-Math-17k: prompt is a list of messages, the answer sits at reward_model.ground_truth.
    rows = [
        {"data_source": "math_dapo", "prompt": [{"content": "Find x.", "role": "user"}],
         "reward_model": {"ground_truth": "34", "style": "rule"}},
        {"data_source": "math_dapo", "prompt": [{"content": "Find y.", "role": "user"}],
         "reward_model": {"ground_truth": "\\frac{1}{2}", "style": "rule"}},
    ]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples = load_examples(path, answer_key="reward_model.ground_truth")
    assert examples[0]["prompt"] == [{"role": "user", "content": "Find x."}]
    assert [e["answer"] for e in examples] == ["34", "\\frac{1}{2}"]
    assert examples[0]["extra"] == {"data_source": "math_dapo"}


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    assert load_examples(path)[0]["prompt"] == "p"


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(missing)


def test_missing_column_names_it_and_the_columns_present(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"no column 'prompt'.*columns present: \['answer', 'question'\]"):
        load_examples(path)
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "gt": "a"}]), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"no column 'answer'.*\['gt', 'prompt'\]"):
        load_examples(tmp_path / "d.parquet")


def test_empty_datasets(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_examples(_write_jsonl(tmp_path / "e.jsonl", []))
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="empty"):
        load_examples(tmp_path / "e.parquet")


@pytest.mark.parametrize("row, match", [
    ({"prompt": 3, "answer": "a"}, "must be a string or a non-empty list"),
    ({"prompt": [{"role": "user"}], "answer": "a"}, "must be a string or a non-empty list"),
    ({"prompt": [], "answer": "a"}, "must be a string or a non-empty list"),
    ({"prompt": "  ", "answer": "a"}, "empty prompt"),
    ({"prompt": "p", "answer": None}, "must be a string or number"),
])
def test_bad_values_name_the_row(tmp_path, row, match):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "a"}, row])
    with pytest.raises(ValueError, match=f"row 1.*{match}"):
        load_examples(path)


def test_bad_json_line_and_unsupported_suffix(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "answer": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        load_examples(path)
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=r"unsupported dataset format '.csv'"):
        load_examples(csv)


# ---------------------------------------------------------------------------------------------
# PromptDataset
# ---------------------------------------------------------------------------------------------


def _ids(batch):
    return [ex["id"] for ex in batch]


def _dataset(n=10, batch_size=3, **kw):
    return PromptDataset([{"id": i} for i in range(n)], batch_size, **kw)


def test_epochs_are_permutations_with_drop_last():
    ds = _dataset(seed=1)
    assert ds.batches_per_epoch == 3
    epoch0 = [_ids(b) for b in ds]
    assert [len(b) for b in epoch0] == [3, 3, 3]
    flat = sum(epoch0, [])
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    epoch1 = [_ids(b) for b in ds]  # iterating again starts the next epoch
    assert ds.epoch == 1 and epoch1 != epoch0


def test_shuffle_is_deterministic_per_seed():
    a, b, c = _dataset(seed=5), _dataset(seed=5), _dataset(seed=6)
    seq_a = [_ids(a.next_batch()) for _ in range(7)]
    assert seq_a == [_ids(b.next_batch()) for _ in range(7)]
    assert seq_a != [_ids(c.next_batch()) for _ in range(7)]


def test_no_shuffle_and_keep_last():
    ds = _dataset(shuffle=False, drop_last=False)
    assert ds.batches_per_epoch == 4
    assert [_ids(b) for b in ds] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert _ids(ds.next_batch()) == [0, 1, 2] and ds.epoch == 1


def test_resume_continues_exactly(tmp_path):
    ref = _dataset(seed=3)
    expected = [_ids(ref.next_batch()) for _ in range(8)]

    first = _dataset(seed=3)
    got = [_ids(first.next_batch()) for _ in range(4)]  # crosses into epoch 1
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert state["epoch"] == 1 and state["position"] == 3

    resumed = _dataset(seed=3)
    resumed.load_state_dict(state)
    got += [_ids(resumed.next_batch()) for _ in range(4)]
    assert got == expected


def test_resume_rejects_a_different_dataset_or_seed():
    state = _dataset(seed=3).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _dataset(seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples"):
        _dataset(n=11, seed=3).load_state_dict(state)


def test_constructor_errors():
    with pytest.raises(ValueError, match="empty"):
        PromptDataset([], 2)
    with pytest.raises(ValueError, match="batch_size"):
        _dataset(batch_size=0)
    with pytest.raises(ValueError, match="exceeds"):
        _dataset(n=2, batch_size=3)


def test_synthetic_examples_feed_the_dataset():
    ds = PromptDataset(synthetic_examples(seed=0, n=8), batch_size=4, seed=0)
    batch = ds.next_batch()
    assert len(batch) == 4 and all(ex["prompt"].startswith("sort ") for ex in batch)

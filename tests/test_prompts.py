"""Prompt sources: JSON, JSONL, text, Parquet, CSV, ShareGPT (truncated file), limits and seeds."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from finemoe.errors import ConfigError
from finemoe.traces.prompts import iter_json_array, load_prompts, sharegpt_prompts


def test_json_list_of_strings_and_objects(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(["a", "b"]))
    assert [p.text for p in load_prompts(tmp_path / "s.json")] == ["a", "b"]
    (tmp_path / "o.json").write_text(json.dumps([{"text": "x", "id": 1}, {"text": "y", "id": 2}]))
    prompts = load_prompts(tmp_path / "o.json", field="text")
    assert [(p.text, p.label) for p in prompts] == [("x", "o.json/0"), ("y", "o.json/1")]
    with pytest.raises(ConfigError, match="--prompt-field"):
        load_prompts(tmp_path / "o.json")
    with pytest.raises(ConfigError, match="no field 'nope'"):
        load_prompts(tmp_path / "o.json", field="nope")


def test_lmsys_prompts(lmsys_prompts):
    prompts = load_prompts(lmsys_prompts)
    assert len(prompts) == 64 and all(p.text for p in prompts)
    assert prompts[5].label == "lmsys-chat-1m-64.json/5"


def test_jsonl_text_parquet_csv(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"q": "one"}\n\n{"q": "two"}\n')
    assert [p.text for p in load_prompts(tmp_path / "p.jsonl", field="q")] == ["one", "two"]
    (tmp_path / "p.txt").write_text("alpha\n\nbeta\n")
    assert [p.text for p in load_prompts(tmp_path / "p.txt")] == ["alpha", "beta"]
    frame = pd.DataFrame({"prompt": ["p1", "p2", "p3"], "n": [1, 2, 3]})
    frame.to_parquet(tmp_path / "p.parquet")
    frame.to_csv(tmp_path / "p.csv", index=False)
    assert [p.text for p in load_prompts(tmp_path / "p.parquet")] == ["p1", "p2", "p3"]
    assert [p.text for p in load_prompts(tmp_path / "p.csv", limit=2)] == ["p1", "p2"]
    with pytest.raises(ConfigError, match="no column 'q'"):
        load_prompts(tmp_path / "p.csv", field="q")


def test_limit_and_seed_are_deterministic(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps([f"p{i}" for i in range(50)]))
    a = load_prompts(tmp_path / "s.json", limit=5, seed=3)
    b = load_prompts(tmp_path / "s.json", limit=5, seed=3)
    c = load_prompts(tmp_path / "s.json", limit=5, seed=4)
    assert a == b and a != c and len(a) == 5
    assert [p.text for p in load_prompts(tmp_path / "s.json", limit=3)] == ["p0", "p1", "p2"]


@pytest.mark.parametrize(
    "content, match",
    [("{not json", "not valid JSON"), ('{"a": 1}', "expected a JSON list"), ("[3]", "expected a string")],
)
def test_malformed_json_is_a_config_error(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_prompts(tmp_path / "bad.json")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(ConfigError, match="no such prompts file"):
        load_prompts(tmp_path / "none.json")
    (tmp_path / "x.yaml").write_text("a: 1")
    with pytest.raises(ConfigError, match="unknown prompts format"):
        load_prompts(tmp_path / "x.yaml")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_prompts(tmp_path / "bad.jsonl")


def test_truncated_json_array_keeps_complete_objects(tmp_path):
    path = tmp_path / "t.json"
    body = json.dumps([{"id": i, "v": "x" * 10} for i in range(3)], indent=1)
    path.write_text(body[: body.rindex('"v"')])  # cut inside the last object
    assert [o["id"] for o in iter_json_array(path)] == [0, 1]


def test_sharegpt_first_human_turns():
    prompts = list(sharegpt_prompts(limit=20))
    assert len(prompts) == 20 and all(p.text.strip() for p in prompts)
    assert all(p.label.startswith("sharegpt/") for p in prompts)
    assert load_prompts("sharegpt", limit=3) == prompts[:3]
    shuffled = load_prompts("sharegpt", limit=3, seed=1)
    assert shuffled == load_prompts("sharegpt", limit=3, seed=1) and shuffled != prompts[:3]

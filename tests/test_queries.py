"""Query files in three formats, their errors (with line numbers), and the seeded split."""

from __future__ import annotations

import json

import pytest

from promptbake.errors import PromptbakeError
from promptbake.queries import load_queries, split_queries


def test_jsonl_query_and_messages(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"query": "hi"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}]}) + "\n"
    )
    qs = load_queries(path)
    assert [q.id for q in qs] == [0, 1]
    assert qs[0].messages == [{"role": "user", "content": "hi"}]
    assert qs[1].text == "c" and len(qs[1].messages) == 3


def test_txt_and_csv(tmp_path):
    (tmp_path / "q.txt").write_text("one\n\n two \n")
    assert [q.text for q in load_queries(tmp_path / "q.txt")] == ["one", "two"]
    (tmp_path / "q.csv").write_text('id,query\n1,"hello, world"\n2,"multi\nline"\n')
    assert [q.text for q in load_queries(tmp_path / "q.csv")] == ["hello, world", "multi\nline"]


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("q.jsonl", '{"query": "ok"}\n{"query": \n', ":2: invalid JSON"),
        ("q.jsonl", '{"query": "ok"}\n{"text": "x"}\n', ":2: expected"),
        ("q.jsonl", '{"query": "  "}\n', ":1: empty"),
        ("q.jsonl", '{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}\n', ":1:"),
        ("q.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', "end with a user"),
        ("q.jsonl", "\n\n", "no queries"),
        ("q.txt", "", "no queries"),
        ("q.csv", "text\nhello\n", "'query' column"),
        ("q.csv", "query\nhello\n\"\"\n", ":3: empty"),
        ("q.yaml", "- a\n", "unknown query file type"),
    ],
)
def test_bad_query_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptbakeError) as info:
        load_queries(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_binary_and_encoding_errors_name_the_line(tmp_path):
    path = tmp_path / "q.txt"
    path.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(PromptbakeError, match=r"q.txt:3: not UTF-8"):
        load_queries(path)
    path.write_bytes(b"fine\n\x00\x00\n")
    with pytest.raises(PromptbakeError, match=r"q.txt:2: binary"):
        load_queries(path)
    with pytest.raises(PromptbakeError, match="not found"):
        load_queries(tmp_path / "missing.txt")


def test_very_long_line_is_refused(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("short\n" + "x" * 1_000_001 + "\n")
    with pytest.raises(PromptbakeError, match=r":2: line of"):
        load_queries(path)


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("".join(f"q{i}\n" for i in range(50)))
    qs = load_queries(path)
    train, held = split_queries(qs, 10, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert {q.id for q in train} | {q.id for q in held} == set(range(50))
    assert [q.id for q in split_queries(qs, 10, seed=3)[1]] == [q.id for q in held]
    assert [q.id for q in split_queries(qs, 10, seed=4)[1]] != [q.id for q in held]
    assert split_queries(qs, 0, seed=3)[1] == []

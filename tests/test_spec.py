"""Prompt files: front matter, sandboxed rendering, includes, checks, and their errors."""

from __future__ import annotations

import os

import pytest

from promptbake.checks import Check, pass_rates
from promptbake.errors import PromptbakeError
from promptbake.spec import load_spec, parse_var_overrides


def write(tmp_path, text, name="p.md"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_front_matter_is_parsed_and_rendered(tmp_path):
    path = write(tmp_path, """---
name: pirate
description: arr
model: SmolLM2-135M-Instruct
queries: q.jsonl
vars: {who: Captain}
checks:
  - {name: greets, starts_with: Ahoy}
  - {name: short, max_words: 30}
  - {name: js, json: [a, b]}
train: {steps: 3, lr: 0.001, kl: full}
verify: {min_kl_gap_closed: 0.2}
---
You are {{ who }}.
{% for r in ["a", "b"] %}- rule {{ r }}
{% endfor %}""")
    spec = load_spec(path)
    assert spec.name == "pirate" and spec.model == "SmolLM2-135M-Instruct"
    assert spec.queries_path == tmp_path / "q.jsonl"
    assert spec.system_prompt == "You are Captain.\n- rule a\n- rule b"
    assert [c.kind for c in spec.checks] == ["starts_with", "max_words", "json"]
    assert spec.train == {"steps": 3, "lr": 0.001, "kl": "full"}
    assert spec.verify.min_kl_gap_closed == 0.2
    assert len(spec.prompt_sha256) == 64


def test_no_front_matter_and_var_overrides(tmp_path):
    path = write(tmp_path, "Hello {{ name }}", name="plain.md")
    spec = load_spec(path, {"name": "world"})
    assert spec.name == "plain" and spec.system_prompt == "Hello world" and spec.queries_path is None


def test_include_inside_folder_works(tmp_path):
    (tmp_path / "rules.md").write_text("Rule one.")
    path = write(tmp_path, "Start. {% include 'rules.md' %}")
    assert load_spec(path).system_prompt == "Start. Rule one."


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("---\nname: x\n", "no closing"),
        ("---\nname: [unclosed\n---\nbody", "not valid YAML"),
        ("---\n- a\n- b\n---\nbody", "must be a YAML mapping"),
        ("---\nnmae: typo\n---\nbody", "nmae"),
        ("---\ntrain: {steps: -1}\n---\nbody", "train.steps"),
        ("---\ntrain: {stepz: 3}\n---\nbody", "stepz"),
        ("---\ntrain: {kl: median}\n---\nbody", "kl"),
        ("---\ntrain: {lora_r: 7}\n---\nbody", "lora_r"),
        ("---\nchecks: [{name: a}]\n---\nbody", "exactly one"),
        ("---\nchecks: [{name: a, contains: x, regex: y}]\n---\nbody", "exactly one"),
        ("---\nchecks: [{name: a, regex: '('}]\n---\nbody", "bad regex"),
        ("---\nname: 'bad name!'\n---\nbody", "name"),
        ("---\nname: x\n---\n   \n", "body is empty"),
        ("line one\n{% if %}\n", ":2: template syntax error"),
        ("---\nname: x\n---\nline\n\n{{ missing }}\n", ":6: undefined"),
        ("{{ ''.__class__.__mro__ }}", "sandbox"),
        ("{% include '../outside.md' %}", "outside"),
        ("{% include 'nope.md' %}", "not found"),
    ],
)
def test_bad_prompt_files_give_one_clear_line(tmp_path, text, fragment):
    sub = tmp_path / "prompt"
    sub.mkdir()
    (tmp_path / "outside.md").write_text("secret")
    path = write(sub, text)
    with pytest.raises(PromptbakeError) as info:
        load_spec(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_symlink_out_of_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    sub = tmp_path / "prompt"
    sub.mkdir()
    os.symlink(secret, sub / "link.md")
    path = write(sub, "{% include 'link.md' %}")
    with pytest.raises(PromptbakeError, match="outside"):
        load_spec(path)


def test_missing_and_binary_prompt_files(tmp_path):
    with pytest.raises(PromptbakeError, match="not found"):
        load_spec(tmp_path / "none.md")
    (tmp_path / "bin.md").write_bytes(b"\x00\x01\x02")
    with pytest.raises(PromptbakeError, match="binary"):
        load_spec(tmp_path / "bin.md")
    (tmp_path / "latin.md").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PromptbakeError, match="UTF-8"):
        load_spec(tmp_path / "latin.md")


def test_rendered_prompt_size_limit(tmp_path):
    path = write(tmp_path, "{% for i in range(30000) %}0123456789{% endfor %}")
    with pytest.raises(PromptbakeError, match="over the"):
        load_spec(path)


def test_var_overrides_parse():
    assert parse_var_overrides(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(PromptbakeError, match="key=value"):
        parse_var_overrides(["novalue"])


@pytest.mark.parametrize(
    "check, good, bad",
    [
        ({"contains": "ahoy"}, "AHOY there", "hello"),
        ({"not_contains": "SmolLM"}, "I am a pirate", "I am smollm"),
        ({"regex": r"\bye\b"}, "Ye be fine", "yes"),
        ({"not_regex": r"sorry|can't"}, "Sure, here you go", "I can't do that"),
        ({"max_words": 3}, "one two three", "one two three four"),
        ({"starts_with": "Ahoy"}, "  ahoy, matey", "Well, ahoy"),
        ({"ends_with": "Arr!"}, "Done. Arr!  ", "Arr! Done."),
        ({"json": True}, '{"a": 1}', "{a: 1}"),
        ({"json": ["a", "b"]}, '```json\n{"a": 1, "b": 2}\n```', '{"a": 1}'),
        ({"contains": "Ahoy", "case_sensitive": True}, "Ahoy", "ahoy"),
    ],
)
def test_checks(check, good, bad):
    c = Check.model_validate({"name": "c", **check})
    assert c.passes(good) and not c.passes(bad)


def test_checks_apply_only_to_tagged_queries():
    from promptbake.checks import check_outcomes

    refuse = Check(name="refuse", contains="sorry", tags=["harmful"])
    outcomes = check_outcomes([refuse], ["sorry", "sure", "sure"], [("harmful",), ("benign",), ("harmful",)])
    assert outcomes["refuse"] == [1.0, 0.0]
    assert pass_rates([refuse], ["sure"], [("benign",)])["refuse"] != pass_rates([refuse], ["sure"], [("benign",)])["refuse"]  # nan


def test_pass_rates_include_all():
    checks = [Check(name="a", contains="x"), Check(name="b", max_words=2)]
    rates = pass_rates(checks, ["x", "x y z", "y"])
    assert rates == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3), "all": pytest.approx(1 / 3)}

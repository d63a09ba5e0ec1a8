"""The bad-input suite: every malformed input gives one line naming the problem, exit code 2, no
traceback, and writes nothing. Prompt files, front matter, templates, query files, CLI flags,
manifests and adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from promptbake.artifact import sha256_file
from promptbake.cli import app

FAST = ["--steps", "1", "--batch-size", "2", "--heldout", "2", "--max-new-tokens", "4"]
PIRATE = Path(__file__).resolve().parents[1] / "prompts" / "pirate.md"
GOOD_QUERIES = "".join(f"question {i}?\n" for i in range(12))


def make_case(root: Path, prompt: str | bytes, queries: str | bytes | None = GOOD_QUERIES, qname: str = "q.txt",
              extra_files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    p = root / "prompt.md"
    p.write_bytes(prompt if isinstance(prompt, bytes) else prompt.encode())
    if queries is not None:
        (root / qname).write_bytes(queries if isinstance(queries, bytes) else queries.encode())
    for name, text in (extra_files or {}).items():
        (root / name).write_text(text)
    return p


def fm(body: str = "Be a pirate.", **keys) -> str:
    lines = ["queries: q.txt"] + [f"{k}: {v}" for k, v in keys.items()]
    return "---\n" + "\n".join(lines) + "\n---\n" + body + "\n"


# (id, prompt text/bytes, queries text/bytes or None, query file name, extra CLI args, expected fragment)
PROMPT_CASES = [
    ("empty-prompt", "", GOOD_QUERIES, "q.txt", [], "empty"),
    ("whitespace-prompt", "  \n\n ", GOOD_QUERIES, "q.txt", [], "empty"),
    ("binary-prompt", b"\x00\x01binary", GOOD_QUERIES, "q.txt", [], "binary"),
    ("latin1-prompt", "caf\xe9".encode("latin-1"), GOOD_QUERIES, "q.txt", [], "UTF-8"),
    ("unclosed-front-matter", "---\nqueries: q.txt\nBe a pirate.", GOOD_QUERIES, "q.txt", [], "closing"),
    ("front-matter-not-yaml", "---\nqueries: [q.txt\n---\nbody", GOOD_QUERIES, "q.txt", [], "not valid YAML"),
    ("front-matter-list", "---\n- a\n---\nbody", GOOD_QUERIES, "q.txt", [], "mapping"),
    ("unknown-key", fm(temperature=0.5), GOOD_QUERIES, "q.txt", [], "temperature"),
    ("wrong-type", fm(train="{steps: many}"), GOOD_QUERIES, "q.txt", [], "steps"),
    ("negative-steps-in-file", fm(train="{steps: -3}"), GOOD_QUERIES, "q.txt", [], "steps"),
    ("check-two-kinds", fm(checks="[{name: a, contains: x, max_words: 3}]"), GOOD_QUERIES, "q.txt", [], "exactly one"),
    ("check-bad-regex", fm(checks="[{name: a, regex: '[a-'}]"), GOOD_QUERIES, "q.txt", [], "regex"),
    ("jinja-syntax", fm("line\n{% for x in %}"), GOOD_QUERIES, "q.txt", [], "syntax error"),
    ("jinja-undefined", fm("Hello {{ nobody }}"), GOOD_QUERIES, "q.txt", [], "undefined"),
    ("jinja-internals", fm("{{ cycler.__init__.__globals__ }}"), GOOD_QUERIES, "q.txt", [], "sandbox"),
    ("include-dotdot", fm("{% include '../secret.md' %}"), GOOD_QUERIES, "q.txt", [], "outside"),
    ("include-absolute", fm("{% include '/etc/passwd' %}"), GOOD_QUERIES, "q.txt", [], "outside"),
    ("huge-render", fm("{% for i in range(1000) %}{% for j in range(300) %}x{% endfor %}{% endfor %}"), GOOD_QUERIES, "q.txt", [], "limit"),
    ("huge-range", fm("{% for i in range(10**9) %}x{% endfor %}"), GOOD_QUERIES, "q.txt", [], "Range too big"),
    ("no-queries-key", "---\nname: x\n---\nbody\n", None, "q.txt", [], "no queries"),
    ("missing-query-file", fm(), None, "q.txt", [], "not found"),
    ("empty-query-file", fm(), "", "q.txt", [], "no queries"),
    ("jsonl-bad-line", fm().replace("q.txt", "q.jsonl"), '{"query": "a"}\n{"query": "b"}\n{"query": \n', "q.jsonl", [], ":3: invalid JSON"),
    ("jsonl-wrong-field", fm().replace("q.txt", "q.jsonl"), '{"question": "a"}\n', "q.jsonl", [], ":1: expected"),
    ("jsonl-bad-tags", fm().replace("q.txt", "q.jsonl"), '{"query": "a", "tags": "x"}\n', "q.jsonl", [], "tags"),
    ("csv-no-query-column", fm().replace("q.txt", "q.csv"), "text\nhello\n", "q.csv", [], "'query' column"),
    ("txt-invalid-utf8", fm(), b"ok\n\xc3\x28 broken\n", "q.txt", [], ":2: not UTF-8"),
    ("txt-binary", fm(), b"ok\nfine\n\x00\x00\x00\n", "q.txt", [], ":3: binary"),
    ("utf16-queries", fm(), "question?\n".encode("utf-16"), "q.txt", [], "UTF-8"),
    ("unknown-extension", fm().replace("q.txt", "q.xml"), "<q/>", "q.xml", [], "unknown query file type"),
    ("too-few-queries", fm(), "one?\ntwo?\n", "q.txt", [], "a batch needs"),
    ("flag-negative-steps", fm(), GOOD_QUERIES, "q.txt", ["--steps", "-1"], "steps"),
    ("flag-zero-temperature", fm(), GOOD_QUERIES, "q.txt", ["--temperature", "0"], "temperature"),
    ("flag-bad-kl", fm(), GOOD_QUERIES, "q.txt", ["--kl", "forward"], "kl"),
    ("flag-steps-word", fm(), GOOD_QUERIES, "q.txt", ["--steps", "many"], "steps: Input should be a valid integer"),
    ("flag-lr-word", fm(), GOOD_QUERIES, "q.txt", ["--lr", "fast"], "lr: Input should be a valid number"),
    ("flag-unservable-rank", fm(), GOOD_QUERIES, "q.txt", ["--lora-r", "24"], "lora_r"),
    ("flag-budget-over-one", fm(), GOOD_QUERIES, "q.txt", ["--activation-memory-budget", "1.5"], "activation_memory_budget"),
    ("flag-budget-without-compile", fm(), GOOD_QUERIES, "q.txt", ["--activation-memory-budget", "0.1", "--no-torch-compile"],
     "applies to compiled layers"),
    ("flag-bad-var", fm(), GOOD_QUERIES, "q.txt", ["--var", "novalue"], "key=value"),
    ("flag-topk-over-vocab", fm(), GOOD_QUERIES, "q.txt", ["--topk", "60000"], "vocabulary"),
    ("flag-unknown-model", fm(), GOOD_QUERIES, "q.txt", ["--model", "./not-a-model"], "unknown model"),
    ("flag-missing-gguf", fm(), GOOD_QUERIES, "q.txt", ["--model", "nothing-here.gguf"], "GGUF file not found"),
]


def assert_clean_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert result.output.rstrip().splitlines()[-1] == errors[0]


@pytest.mark.parametrize("case", PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_bad_compile_inputs(tmp_path, tiny_model_dir, case):
    _, prompt, queries, qname, extra, fragment = case
    (tmp_path / "secret.md").write_text("secret")
    p = make_case(tmp_path / "case", prompt, queries, qname)
    out = tmp_path / "out"
    args = ["compile", str(p), "--out", str(out), *FAST, *extra]
    if "--model" not in extra:
        args += ["--model", str(tiny_model_dir)]
    assert_clean_error(CliRunner().invoke(app, args), fragment)
    assert not out.exists() and not (tmp_path / ".out.work").exists()


def test_a_100_megabyte_line_is_refused(tmp_path, tiny_model_dir):
    p = make_case(tmp_path / "case", fm(), None)
    with open(tmp_path / "case" / "q.txt", "w") as f:
        f.write("normal question?\n")
        f.write("x" * 100_000_000 + "\n")
    result = CliRunner().invoke(app, ["compile", str(p), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), *FAST])
    assert_clean_error(result, ":2: line of 100,000,000 characters")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("bad-adapter")
    p = make_case(root / "case", fm() + "")
    out = root / "adapter"
    result = CliRunner().invoke(app, ["compile", str(p), "--model", str(tiny_model_dir), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    return out


def broken_copy(adapter: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / "broken"
    shutil.copytree(adapter, bad)
    manifest = json.loads((bad / "bake.json").read_text())
    weights = bad / "adapter_model.safetensors"
    if how == "no-manifest":
        (bad / "bake.json").unlink()
    elif how == "manifest-not-json":
        (bad / "bake.json").write_text("{not json")
    elif how == "manifest-list":
        (bad / "bake.json").write_text("[1, 2]")
    elif how == "manifest-version":
        manifest["format_version"] = 99
        (bad / "bake.json").write_text(json.dumps(manifest))
    elif how == "manifest-missing-key":
        del manifest["base_model"]
        (bad / "bake.json").write_text(json.dumps(manifest))
    elif how == "weights-missing":
        weights.unlink()
    elif how == "weights-truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "weights-wrong-shape":
        tensors = load_file(str(weights))
        tensors = {k: (v[:, :-1].contiguous() if "lora_A" in k else v) for k, v in tensors.items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})
        manifest["adapter_sha256"] = sha256_file(weights)  # a consistent manifest: only the shapes are wrong
        (bad / "bake.json").write_text(json.dumps(manifest))
    return bad


ADAPTER_CASES = [
    ("no-manifest", "manifest missing"),
    ("manifest-not-json", "not valid JSON"),
    ("manifest-list", "JSON object"),
    ("manifest-version", "format_version 99"),
    ("manifest-missing-key", "base_model"),
    ("weights-missing", "weights missing"),
    ("weights-truncated", "sha256 differs"),
    ("weights-wrong-shape", "does not fit the base model"),
]


@pytest.mark.parametrize("how, fragment", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
@pytest.mark.parametrize("command", ["verify", "chat"])
def test_bad_adapters(tmp_path, adapter, how, fragment, command):
    bad = broken_copy(adapter, tmp_path, how)
    args = [command, str(bad)] + (["-m", "hi", "--max-new-tokens", "2"] if command == "chat" else ["--json", str(tmp_path / "r.json")])
    assert_clean_error(CliRunner().invoke(app, args), fragment)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["verify", "no-such-adapter"], "not found"),
        (["chat", "no-such-adapter", "-m", "hi"], "not found"),
        (["eval", "--suite", "nope"], "unknown suite"),
        (["eval", "--suite", "gsm8k", "--limit", "0", "--data", "."], "limit must be positive"),
        (["eval", "--suite", "gsm8k", "--data", "/nonexistent"], "not found"),
        (["compare", str(PIRATE), "--methods", "opcd,dpo"], "unknown ['dpo']"),
        (["compare", str(PIRATE), "--teacher-modes", "ema"], "unknown ['ema']"),
        (["compare", str(PIRATE), "--seeds", "0"], "seeds must be positive"),
        (["compare", str(PIRATE), "--suites", "nope"], "unknown suite"),
        (["compare", str(PIRATE), "--eval-limit", "0"], "eval-limit must be positive"),
        (["compare", str(PIRATE), "--suites", "mmlu", "--eval-limit", "mmlu=0"], "positive, got 0 for mmlu"),
        (["compare", str(PIRATE), "--suites", "mmlu", "--eval-limit", "gsm8k=5"], "gsm8k, which are not among the suites"),
        (["compare", str(PIRATE), "--eval-limit", "mmlu=many"], "'mmlu=many' is not N or suite=N"),
        (["compare", str(PIRATE), "--eval-batch-size", "0"], "eval-batch-size must be positive"),
        (["compare", "no-such-prompt.md"], "no-such-prompt.md"),
    ],
)
def test_bad_commands(args, fragment):
    assert_clean_error(CliRunner().invoke(app, args), fragment)


def test_verify_limit_zero(adapter, tmp_path):
    assert_clean_error(CliRunner().invoke(app, ["verify", str(adapter), "--limit", "0"]), "limit must be positive")


HELDOUT_CASES = [
    ("heldout-missing", {"heldout": "h.txt"}, {}, [], "h.txt: query file not found"),
    ("heldout-is-training-file", {"heldout": "q.txt"}, {}, [], "is the training query file"),
    ("heldout-overlaps-training", {"heldout": "h.txt"}, {"h.txt": "a new one?\nQuestion   3?\n"}, [], "also query 4"),
    ("heldout-bad-json", {"heldout": "h.jsonl"}, {"h.jsonl": '{"query": "a"}\n{"query": \n'}, [], "h.jsonl:2: invalid JSON"),
    ("heldout-empty", {"heldout": "h.txt"}, {"h.txt": "\n"}, [], "no queries"),
    ("heldout-not-a-string", {"heldout": "[a, b]"}, {}, [], "heldout"),
    ("heldout-flag-missing", {}, {}, ["--heldout-queries", "nowhere.txt"], "nowhere.txt: query file not found"),
    ("heldout-count-negative", {"heldout": "h.txt"}, {"h.txt": "a new one?\n"}, ["--heldout", "-1"], "heldout"),
    ("heldout-count-word", {"heldout": "h.txt"}, {"h.txt": "a new one?\n"}, ["--heldout", "some"], "heldout"),
    ("heldout-count-in-file", {"heldout": "h.txt", "train": "{heldout: -2}"}, {"h.txt": "a new one?\n"}, [], "heldout"),
    ("max-new-tokens-word", {}, {}, ["--max-new-tokens", "long"], "max_new_tokens"),
    ("max-new-tokens-zero", {}, {}, ["--max-new-tokens", "0"], "max_new_tokens"),
]


@pytest.mark.parametrize("case", HELDOUT_CASES, ids=[c[0] for c in HELDOUT_CASES])
def test_bad_heldout_inputs(tmp_path, tiny_model_dir, case):
    _, keys, files, extra, fragment = case
    p = make_case(tmp_path / "case", fm(**keys), extra_files=files)
    out = tmp_path / "out"
    flags = FAST
    for flag in ("--max-new-tokens", "--heldout"):  # the case's own value replaces FAST's
        if flag in extra:
            at = flags.index(flag)
            flags = flags[:at] + flags[at + 2:]
    args = ["compile", str(p), "--out", str(out), "--model", str(tiny_model_dir), *flags, *extra]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert_clean_error(result, fragment)
    assert not out.exists() and not (tmp_path / ".out.work").exists()

"""Shared fixtures: the real default model, a tiny model built from its config and tokenizer, no network."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (`make test` runs two workers) each worker, and every process it starts, gets its
# share of the cores: torch processes that each spread over all of them slow one another down many times over.
# Set before torch is imported, so its thread pools start at that size.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any connection that leaves the machine: promptbake's default path must work offline."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX):
            raise OSError(f"network access blocked in tests: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from promptbake.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir, tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's config shape and its real tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from promptbake.models import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-smollm2")
    config = AutoConfig.from_pretrained(default_model_dir)
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(default_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny model, fp32, eval mode."""
    from promptbake.models import load_model, load_tokenizer

    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def write_prompt(folder: Path, body: str = "You are a pirate. Say ahoy.", front: str | None = None, queries: int = 40) -> Path:
    """A prompt file plus a query file beside it; returns the prompt path."""
    folder.mkdir(parents=True, exist_ok=True)
    qfile = folder / "queries.txt"
    qfile.write_text("".join(f"Question number {i}: what is {i} plus {i}?\n" for i in range(queries)))
    if front is None:
        front = "queries: queries.txt\n"
    text = f"---\n{front}---\n{body}\n" if front else body
    path = folder / "prompt.md"
    path.write_text(text)
    return path


def pirate_with_short_heldout(folder: Path, heldout: int = 8) -> Path:
    """The shipped pirate prompt, measured on the first `heldout` queries of its separate held-out file: the
    real-model tests need KL to fall, not a 40-query measurement (most of a small compile's time)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = REPO / "prompts"
    short = folder / "pirate_heldout.jsonl"
    short.write_text("".join((source / "pirate_heldout.jsonl").read_text().splitlines(keepends=True)[:heldout]))
    text = (source / "pirate.md").read_text()
    text = text.replace("queries: pirate_queries.jsonl", f"queries: {source / 'pirate_queries.jsonl'}", 1)
    assert f"queries: {source}" in text and "heldout: pirate_heldout.jsonl" in text
    path = folder / "pirate.md"
    path.write_text(text)
    return path


def run_cli(*args):
    """The `promptbake` CLI in-process, every argument as text."""
    from typer.testing import CliRunner

    from promptbake.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, fragment: str) -> None:
    """Exit code 2, and the output ends with one `error:` line that names `fragment`; no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error:") and fragment in lines[-1], result.output
    assert "Traceback" not in result.output

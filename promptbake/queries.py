"""Unlabeled user queries: JSONL, TXT or CSV, and a seeded train/held-out split.

A query is a list of chat messages without a system message (user, and optionally earlier
user/assistant turns, ending with a user turn). Its id is its row number in the file, so a manifest's
held-out ids point back at the same rows.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from promptbake.errors import PromptbakeError

MAX_LINE_CHARS = 1_000_000
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Query:
    id: int
    messages: Messages
    tags: tuple[str, ...] = ()
    rule: str | None = None  # the prompt rule a synthesised query exercises (promptbake.rules ids)

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def _tags_from_json(obj: object, where: str) -> tuple[str, ...]:
    tags = obj.get("tags", []) if isinstance(obj, dict) else []
    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise PromptbakeError(f"{where}: 'tags' must be a list of strings")
    return tuple(tags)


def _rule_from_json(obj: object, where: str) -> str | None:
    rule = obj.get("rule") if isinstance(obj, dict) else None
    if rule is not None and not (isinstance(rule, str) and rule.strip()):
        raise PromptbakeError(f"{where}: 'rule' must be a non-empty string")
    return rule


def _messages_from_json(obj: object, where: str) -> Messages:
    if isinstance(obj, dict) and isinstance(obj.get("query"), str):
        if not obj["query"].strip():
            raise PromptbakeError(f"{where}: empty 'query'")
        return [{"role": "user", "content": obj["query"]}]
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        msgs = obj["messages"]
        for m in msgs:
            if not (isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)):
                raise PromptbakeError(f"{where}: each message needs role user|assistant and string content (no system)")
        if not msgs or msgs[-1]["role"] != "user":
            raise PromptbakeError(f"{where}: 'messages' must end with a user message")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    raise PromptbakeError(f"{where}: expected an object with a string 'query' or a 'messages' list")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PromptbakeError(f"{path}:{line}: not UTF-8 text") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise PromptbakeError(f"{path}:{line}: binary data (NUL byte) in a query file")
    for number, line in enumerate(text.splitlines(), 1):
        if len(line) > MAX_LINE_CHARS:
            raise PromptbakeError(f"{path}:{number}: line of {len(line):,} characters, over the {MAX_LINE_CHARS:,} limit")
    return text


def load_queries(path: str | Path) -> list[Query]:
    """Read queries from .jsonl, .txt or .csv (a `query` column)."""
    path = Path(path)
    if not path.is_file():
        raise PromptbakeError(f"{path}: query file not found")
    text = _read_text(path)
    suffix = path.suffix.lower()
    messages: list[Messages] = []
    tags: list[tuple[str, ...]] = []
    rules: list[str | None] = []
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptbakeError(f"{path}:{number}: invalid JSON: {e.msg}") from None
            messages.append(_messages_from_json(obj, f"{path}:{number}"))
            tags.append(_tags_from_json(obj, f"{path}:{number}"))
            rules.append(_rule_from_json(obj, f"{path}:{number}"))
    elif suffix == ".txt":
        messages = [[{"role": "user", "content": line.strip()}] for line in text.splitlines() if line.strip()]
    elif suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text))
            if not reader.fieldnames or "query" not in reader.fieldnames:
                raise PromptbakeError(f"{path}:1: CSV needs a 'query' column (found {reader.fieldnames or 'no header'})")
            for row in reader:
                value = (row.get("query") or "").strip()
                if not value:
                    raise PromptbakeError(f"{path}:{reader.line_num}: empty 'query' value")
                messages.append([{"role": "user", "content": value}])
        except csv.Error as e:
            raise PromptbakeError(f"{path}: malformed CSV: {e}") from None
    else:
        raise PromptbakeError(f"{path}: unknown query file type '{suffix}' (use .jsonl, .txt or .csv)")
    if not messages:
        raise PromptbakeError(f"{path}: no queries in file")
    tags = tags or [()] * len(messages)
    rules = rules or [None] * len(messages)
    return [Query(id=i, messages=m, tags=t, rule=r) for i, (m, t, r) in enumerate(zip(messages, tags, rules))]


def split_queries(queries: list[Query], heldout: int, seed: int) -> tuple[list[Query], list[Query]]:
    """Seeded split: (train, held-out). The same file, count and seed always give the same split."""
    order = list(range(len(queries)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:heldout])
    held_set = set(held)
    return [q for q in queries if q.id not in held_set], [queries[i] for i in held]

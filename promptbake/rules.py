"""A rendered system prompt split into rules: what query synthesis writes queries for, and what per-rule
results are grouped by.

A rule is a list item (numbered or bulleted, with its continuation lines and nested items) or, outside
lists, a sentence that instructs (always, never, must, an imperative opening...). Headings are not rules;
they name the section each rule belongs to. A rule's id is a short hash of its normalised text, so it stays
the same when rules are added or moved around it, and changes when its wording changes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_ITEM = re.compile(r"^(\s*)(?:\d{1,3}[.)]|[-*+•])\s+(.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
# Words that mark a sentence as an instruction rather than description.
_MODAL = re.compile(
    r"\b(always|never|must|mustn't|should|shouldn't|do not|don't|only|avoid|refuse|decline|make sure|"
    r"be sure|required?|forbidden|not allowed|at most|at least|no more than|every reply|each reply|"
    r"instead of|unless)\b",
    re.IGNORECASE,
)
_IMPERATIVE = re.compile(
    r"^(answer|ask|avoid|be|begin|call|check|decline|describe|end|explain|follow|format|give|greet|help|"
    r"include|keep|list|mention|name|offer|point|politely|quote|recommend|redirect|refer|refuse|remind|reply|"
    r"respond|say|send|sign|speak|start|state|stay|suggest|tell|treat|use|walk|write)\b",
    re.IGNORECASE,
)
MIN_RULE_WORDS = 3


@dataclass(frozen=True)
class Rule:
    id: str
    section: str
    text: str


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def rule_id(text: str) -> str:
    return "r-" + hashlib.sha256(_normalise(text).encode()).hexdigest()[:8]


def _is_instruction(sentence: str) -> bool:
    return bool(_MODAL.search(sentence) or _IMPERATIVE.match(sentence.strip()))


def split_rules(prompt: str) -> list[Rule]:
    """Rules of a rendered prompt in reading order; duplicates (same normalised text) kept once."""
    rules: list[Rule] = []
    section = ""
    item: list[str] | None = None
    item_indent = 0
    paragraph: list[str] = []

    def close_item() -> None:
        nonlocal item
        if item:
            rules.append(Rule("", section, " ".join(" ".join(item).split())))
        item = None

    def close_paragraph() -> None:
        text = " ".join(" ".join(paragraph).split())
        paragraph.clear()
        for sentence in _SENTENCE_END.split(text):
            if _is_instruction(sentence):
                rules.append(Rule("", section, sentence.strip()))

    for line in prompt.splitlines():
        heading = _HEADING.match(line)
        listed = _ITEM.match(line)
        if heading:
            close_item()
            close_paragraph()
            section = heading.group(1).strip()
        elif listed and (item is None or len(listed.group(1)) <= item_indent):
            close_item()
            close_paragraph()
            item, item_indent = [listed.group(2)], len(listed.group(1))
        elif not line.strip():
            close_paragraph()  # a blank line ends a paragraph; a list item may go on after it if indented
            if item is not None:
                item.append("")
        elif item is not None and (line[:1].isspace() or listed):
            item.append(line.strip())  # continuation line or nested item
        else:
            close_item()
            paragraph.append(line.strip())
    close_item()
    close_paragraph()

    out: list[Rule] = []
    seen: set[str] = set()
    for rule in rules:
        key = _normalise(rule.text)
        if len(key.split()) < MIN_RULE_WORDS or key in seen:
            continue
        seen.add(key)
        out.append(Rule(rule_id(rule.text), rule.section, rule.text))
    return out

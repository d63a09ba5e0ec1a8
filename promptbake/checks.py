"""Behaviour checks declared in a prompt file, and their pass rates over a set of responses.

Each check has a name and exactly one kind: contains, not_contains, regex, not_regex, max_words, starts_with,
ends_with, json. Text comparisons ignore case unless `case_sensitive: true`; starts_with/ends_with ignore
surrounding whitespace.
"""

from __future__ import annotations

import json
import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

KINDS = ("contains", "not_contains", "regex", "not_regex", "max_words", "starts_with", "ends_with", "json")


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    contains: str | None = None
    not_contains: str | None = None
    regex: str | None = None
    not_regex: str | None = None
    max_words: int | None = Field(None, gt=0)
    starts_with: str | None = None
    ends_with: str | None = None
    json_: bool | list[str] | None = Field(None, alias="json", description="true, or a list of required keys")
    case_sensitive: bool = False
    tags: list[str] | None = Field(None, description="Apply only to queries carrying one of these tags.")

    @model_validator(mode="after")
    def _one_kind(self) -> "Check":
        kinds = [k for k in KINDS if getattr(self, "json_" if k == "json" else k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"check '{self.name}' needs exactly one of {', '.join(KINDS)}; got {kinds or 'none'}")
        for pattern in (self.regex, self.not_regex):
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"check '{self.name}': bad regex: {e}") from None
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, "json_" if k == "json" else k) is not None)

    def applies(self, query_tags: tuple[str, ...] | list[str]) -> bool:
        return self.tags is None or any(t in self.tags for t in query_tags)

    def passes(self, response: str) -> bool:
        text = response.strip()
        fold = (lambda s: s) if self.case_sensitive else str.casefold
        if self.contains is not None:
            return fold(self.contains) in fold(text)
        if self.not_contains is not None:
            return fold(self.not_contains) not in fold(text)
        flags = 0 if self.case_sensitive else re.IGNORECASE
        if self.regex is not None:
            return re.search(self.regex, text, flags) is not None
        if self.not_regex is not None:
            return re.search(self.not_regex, text, flags) is None
        if self.max_words is not None:
            return len(text.split()) <= self.max_words
        if self.starts_with is not None:
            return fold(text).startswith(fold(self.starts_with))
        if self.ends_with is not None:
            return fold(text).endswith(fold(self.ends_with))
        return _json_passes(text, self.json_)


def _json_passes(text: str, required: bool | list[str] | None) -> bool:
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    if isinstance(required, list):
        return isinstance(value, dict) and all(key in value for key in required)
    return bool(required)


def check_outcomes(checks: list[Check], responses: list[str], tags: list[tuple[str, ...]] | None = None) -> dict[str, list[float]]:
    """Per check, one 0/1 per response it applies to; 'all' holds when every applicable check passes."""
    tags = tags or [()] * len(responses)
    out: dict[str, list[float]] = {c.name: [float(c.passes(r)) for r, t in zip(responses, tags) if c.applies(t)] for c in checks}
    if checks:
        out["all"] = [float(all(c.passes(r) for c in checks if c.applies(t))) for r, t in zip(responses, tags)]
    return out


def pass_rates(checks: list[Check], responses: list[str], tags: list[tuple[str, ...]] | None = None) -> dict[str, float]:
    """Fraction of (applicable) responses passing each check, plus 'all'."""
    if not responses:
        return {}
    return {name: (sum(v) / len(v) if v else float("nan")) for name, v in check_outcomes(checks, responses, tags).items()}

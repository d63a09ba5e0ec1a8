"""Behaviour checks declared in a prompt file, and their pass rates over a set of responses.

Each check has a name and exactly one kind: contains, not_contains, regex, max_words, starts_with,
ends_with, json. Text comparisons ignore case unless `case_sensitive: true`; starts_with/ends_with ignore
surrounding whitespace.
"""

from __future__ import annotations

import json
import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

KINDS = ("contains", "not_contains", "regex", "max_words", "starts_with", "ends_with", "json")


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    contains: str | None = None
    not_contains: str | None = None
    regex: str | None = None
    max_words: int | None = Field(None, gt=0)
    starts_with: str | None = None
    ends_with: str | None = None
    json_: bool | list[str] | None = Field(None, alias="json", description="true, or a list of required keys")
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> "Check":
        kinds = [k for k in KINDS if getattr(self, "json_" if k == "json" else k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"check '{self.name}' needs exactly one of {', '.join(KINDS)}; got {kinds or 'none'}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"check '{self.name}': bad regex: {e}") from None
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, "json_" if k == "json" else k) is not None)

    def passes(self, response: str) -> bool:
        text = response.strip()
        fold = (lambda s: s) if self.case_sensitive else str.casefold
        if self.contains is not None:
            return fold(self.contains) in fold(text)
        if self.not_contains is not None:
            return fold(self.not_contains) not in fold(text)
        if self.regex is not None:
            return re.search(self.regex, text, 0 if self.case_sensitive else re.IGNORECASE) is not None
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


def pass_rates(checks: list[Check], responses: list[str]) -> dict[str, float]:
    """Fraction of responses passing each check, plus 'all' (every check passes)."""
    if not responses:
        return {}
    rates = {c.name: sum(c.passes(r) for r in responses) / len(responses) for c in checks}
    if checks:
        rates["all"] = sum(all(c.passes(r) for c in checks) for r in responses) / len(responses)
    return rates

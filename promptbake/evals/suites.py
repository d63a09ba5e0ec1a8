"""Suite definitions (the YAML files in `evals/`), their data readers, and the items they yield."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from promptbake.config import setting_error
from promptbake.errors import PromptbakeError
from promptbake.evals.parsing import normalise_number

EVALS_DIR = Path(__file__).resolve().parents[2] / "evals"


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    task: Literal["multiple_choice", "yes_no", "numeric", "refusal"]
    format: Literal["jsonl", "csv", "lines"]
    path: str
    hub: str | None = None
    question: str
    options: str | list[str] | None = None
    answer: str | None = None
    label: str | None = None
    labels_path: str | None = None
    yes_value: str | None = None
    yes_threshold: float | None = None
    unsafe_value: str | None = None
    group_by: str | None = None
    delimiter: str = ","
    max_new_tokens: int = 64
    parser: str | None = None  # how answers are read (promptbake.evals.parsing.PARSERS); default: the task's own
    template: str

    @model_validator(mode="after")
    def _known_parser(self) -> "SuiteSpec":
        from promptbake.evals.parsing import PARSERS

        if self.parser is not None and self.parser not in PARSERS:
            raise ValueError(f"parser '{self.parser}' is not one of {sorted(PARSERS)}")
        return self


@dataclass
class EvalItem:
    prompt: str
    gold: str | None
    group: str | None
    options: list[str] = field(default_factory=list)


def list_suites() -> list[str]:
    return sorted(p.stem for p in EVALS_DIR.glob("*.yaml"))


def load_suite(name: str) -> SuiteSpec:
    path = Path(name) if name.endswith((".yaml", ".yml")) else EVALS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PromptbakeError(f"unknown suite '{name}' (known: {', '.join(list_suites())})")
    try:
        return SuiteSpec.model_validate(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as e:
        raise PromptbakeError(f"{path}: invalid suite file: {str(e).splitlines()[0]}") from None
    except ValidationError as e:
        raise PromptbakeError(f"{path}: invalid suite file: {setting_error(e)}") from None


def data_root(data: str | Path | None) -> Path | None:
    value = data or os.environ.get("PROMPTBAKE_DATA")
    return Path(value) if value else None


def _read_rows(suite: SuiteSpec, path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        if suite.format == "jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise PromptbakeError(f"{path}:{number}: invalid JSON: {e.msg}") from None
        elif suite.format == "csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter=suite.delimiter))
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
            rows = [{suite.question: t} for t in texts]
            if suite.labels_path:
                labels_file = path.parent / Path(suite.labels_path).name
                labels = labels_file.read_text().split()
                if len(labels) != len(texts):
                    raise PromptbakeError(f"{labels_file}: {len(labels)} labels for {len(texts)} lines in {path}")
                for row, label in zip(rows, labels):
                    row[suite.label or "label"] = label
    except UnicodeDecodeError as e:
        raise PromptbakeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except csv.Error as e:
        raise PromptbakeError(f"{path}: malformed CSV: {e}") from None
    if not rows:
        raise PromptbakeError(f"{path}: no rows")
    return rows


def split_groups(groups: list[str]) -> tuple[set[str], set[str]]:
    """A fixed half/half split of a suite's groups (subjects): train groups to bake on, test groups to evaluate
    on, as in the paper's held-out-subject setup. Seeded and independent of the data's row order."""
    names = sorted(set(groups))
    random.Random(0).shuffle(names)
    half = (len(names) + 1) // 2
    return set(names[:half]), set(names[half:])


def load_items(suite: SuiteSpec, data: str | Path | None, limit: int | None = None, seed: int = 0,
               groups: Literal["all", "train", "test"] = "all") -> list[EvalItem]:
    """Rows of the suite's data file as rendered prompts with gold answers; `limit` takes a seeded sample;
    `groups` keeps only the train or test half of the suite's groups (see split_groups)."""
    if groups not in ("all", "train", "test"):
        raise PromptbakeError(f"--groups must be all, train or test, got {groups!r}")
    if groups != "all" and not suite.group_by:
        raise PromptbakeError(f"suite {suite.name} has no group_by column, so it has no train/test group split")
    if limit is not None and limit <= 0:
        raise PromptbakeError(f"--limit must be positive, got {limit}")
    root = data_root(data)
    if root is None:
        raise PromptbakeError(f"suite {suite.name}: no data location; pass --data DIR or set PROMPTBAKE_DATA")
    path = root / suite.path
    if not path.is_file():
        hint = f" (hub dataset {suite.hub} needs network and the `datasets` package)" if suite.hub else ""
        raise PromptbakeError(f"{path}: data file for suite {suite.name} not found{hint}")
    if suite.labels_path:
        labels = root / suite.labels_path
        if not labels.is_file():
            raise PromptbakeError(f"{labels}: labels file for suite {suite.name} not found")
    rows = _read_rows(suite, path)
    needed = [suite.question, suite.answer, suite.label, suite.group_by]
    needed += suite.options if isinstance(suite.options, list) else [suite.options]
    for column in filter(None, needed):
        if column not in rows[0]:
            raise PromptbakeError(f"{path}: suite {suite.name} needs column '{column}' (found {sorted(rows[0])})")
    order = list(range(len(rows)))
    if groups != "all":
        keep = split_groups([str(r[suite.group_by]) for r in rows])[0 if groups == "train" else 1]
        order = [i for i in order if str(rows[i][suite.group_by]) in keep]
    if limit is not None and limit < len(order):
        order = sorted(random.Random(seed).sample(order, limit))
    template = SandboxedEnvironment(autoescape=False).from_string(suite.template)
    items = []
    for i in order:
        row = rows[i]
        items.append(EvalItem(
            prompt=template.render(**row),
            gold=_gold(suite, row),
            group=str(row[suite.group_by]) if suite.group_by else None,
            options=_options(suite, row),
        ))
    return items


def export_queries(items: list[EvalItem], path: str | Path) -> int:
    """Write the items' questions (no answers) as a JSONL query file to bake on; returns how many."""
    from promptbake.atomic import write_text_atomic

    write_text_atomic(path, "".join(json.dumps({"query": it.prompt}) + "\n" for it in items))
    return len(items)


def _options(suite: SuiteSpec, row: dict) -> list[str]:
    if isinstance(suite.options, list):
        return [str(row[c]) for c in suite.options]
    if isinstance(suite.options, str):
        return [str(c) for c in row[suite.options]]
    return []


def _gold(suite: SuiteSpec, row: dict) -> str | None:
    if suite.task == "multiple_choice":
        return str(row[suite.answer]).strip().upper()
    if suite.task == "numeric":
        return normalise_number(str(row[suite.answer]).split("####")[-1])
    if suite.task == "yes_no":
        value = str(row[suite.label]).strip()
        if suite.yes_threshold is not None:
            return "yes" if float(value) >= suite.yes_threshold else "no"
        return "yes" if value == suite.yes_value else "no"
    if suite.task == "refusal" and suite.label:
        return "unsafe" if str(row[suite.label]).strip() == suite.unsafe_value else "safe"
    return "unsafe"



"""Prompt files: Markdown with optional YAML front matter, rendered in a sandboxed Jinja2 environment.

A prompt file is data written by someone else: templates cannot reach Python internals, includes cannot
leave the prompt's own folder (no `..`, no symlinks out), and the rendered prompt has a size limit.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from promptbake.checks import Check
from promptbake.config import BakeConfig, setting_error
from promptbake.errors import PromptbakeError

MAX_PROMPT_CHARS = 200_000
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*\r?\n?", re.DOTALL | re.MULTILINE)


class VerifyThresholds(BaseModel):
    """Minimums `promptbake verify` enforces; any may be left out."""

    model_config = ConfigDict(extra="forbid")

    min_kl_gap_closed: float | None = Field(None, le=1)
    min_check_ratio: float | None = Field(None, ge=0, description="Baked pass rate / teacher pass rate, each check.")
    min_exact_match: float | None = Field(None, ge=0, le=1)
    min_token_agreement: float | None = Field(None, ge=0, le=1)
    max_length_change: float | None = Field(
        None, ge=0, description="Largest |baked/teacher - 1| of the mean sampled answer length (0.25: within ±25 %).")


class FrontMatter(BaseModel):
    """The YAML block at the top of a prompt file. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model: str | None = None
    queries: str | None = None
    heldout: str | None = Field(None, description="Query file used only to measure the bake (never trained on).")
    vars: dict[str, Any] = Field(default_factory=dict)
    checks: list[Check] = Field(default_factory=list)
    train: dict[str, Any] = Field(default_factory=dict)
    verify: VerifyThresholds = Field(default_factory=VerifyThresholds)


class PromptSpec(BaseModel):
    """A parsed, rendered prompt file."""

    path: Path
    name: str
    description: str
    model: str | None
    queries_path: Path | None
    heldout_path: Path | None
    checks: list[Check]
    train: dict[str, Any]
    verify: VerifyThresholds
    vars: dict[str, Any]
    system_prompt: str
    file_sha256: str

    @property
    def prompt_sha256(self) -> str:
        return hashlib.sha256(self.system_prompt.encode()).hexdigest()


class _FolderLoader(jinja2.BaseLoader):
    """Loads includes from one folder only, after resolving symlinks and `..`."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def get_source(self, environment, template):
        target = (self.root / template).resolve()
        if not target.is_relative_to(self.root):
            raise PromptbakeError(f"include '{template}' points outside the prompt's folder {self.root}")
        if not target.is_file():
            raise jinja2.TemplateNotFound(template)
        source = target.read_text(encoding="utf-8")
        mtime = target.stat().st_mtime
        return source, str(target), lambda: target.stat().st_mtime == mtime


def _split_front_matter(text: str) -> tuple[str | None, str, int]:
    """(yaml text or None, body, number of lines before the body)."""
    match = _FRONT_MATTER.match(text)
    if not match:
        if text.startswith("---"):
            raise ValueError("front matter starts with '---' but has no closing '---' line")
        return None, text, 0
    return match.group(1), text[match.end():], text[: match.end()].count("\n")


def _pydantic_message(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"key '{key}': {first['msg']}"


def _template_line(exc: BaseException, template_name: str) -> int | None:
    """Line of the template where a render-time error happened (Jinja keeps it in the traceback)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == template_name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render_template(body: str, folder: Path, variables: dict[str, Any], where: str, line_offset: int) -> str:
    """Render a prompt body in a sandbox; errors name the file and line."""
    env = SandboxedEnvironment(
        loader=_FolderLoader(folder),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    name = "<prompt body>"
    try:
        template = env.from_string(body)
        template.name = template.filename = name
        rendered = template.render(**variables)
    except jinja2.TemplateSyntaxError as e:
        line = (e.lineno or 0) + line_offset if e.filename in (None, name, "<template>") else e.lineno
        source = where if e.filename in (None, name, "<template>") else e.filename
        raise PromptbakeError(f"{source}:{line}: template syntax error: {e.message}") from None
    except jinja2.TemplateNotFound as e:
        raise PromptbakeError(f"{where}: include '{e.name}' not found in {folder}") from None
    except jinja2.exceptions.SecurityError as e:
        raise PromptbakeError(f"{where}: template tried something the sandbox forbids: {e}") from None
    except jinja2.UndefinedError as e:
        line = _template_line(e, name)
        at = f":{line + line_offset}" if line else ""
        raise PromptbakeError(f"{where}{at}: undefined template variable: {e.message}") from None
    except PromptbakeError as e:
        raise PromptbakeError(f"{where}: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, ZeroDivisionError, OverflowError, RecursionError) as e:
        raise PromptbakeError(f"{where}: template error: {e}") from None
    if len(rendered) > MAX_PROMPT_CHARS:
        raise PromptbakeError(f"{where}: rendered prompt is {len(rendered):,} characters, over the {MAX_PROMPT_CHARS:,} limit")
    return rendered


def parse_var_overrides(pairs: list[str]) -> dict[str, str]:
    """`--var key=value` pairs into a dict."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PromptbakeError(f"--var '{pair}': expected key=value")
        out[key.strip()] = value
    return out


def load_spec(path: str | Path, var_overrides: dict[str, str] | None = None) -> PromptSpec:
    """Read, validate and render a prompt file."""
    path = Path(path)
    if not path.is_file():
        raise PromptbakeError(f"{path}: prompt file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptbakeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if "\x00" in text:
        raise PromptbakeError(f"{path}: binary data (NUL byte) in a prompt file")
    if not text.strip():
        raise PromptbakeError(f"{path}: prompt file is empty")
    try:
        fm_text, body, offset = _split_front_matter(text)
    except ValueError as e:
        raise PromptbakeError(f"{path}: {e}") from None
    data: Any = {}
    if fm_text is not None:
        try:
            data = yaml.safe_load(fm_text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 2}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise PromptbakeError(f"{path}{line}: front matter is not valid YAML: {problem}") from None
        if not isinstance(data, dict):
            raise PromptbakeError(f"{path}: front matter must be a YAML mapping, got {type(data).__name__}")
    try:
        fm = FrontMatter.model_validate(data)
    except ValidationError as e:
        raise PromptbakeError(f"{path}: front matter {_pydantic_message(e)}") from None
    try:
        BakeConfig.from_layers(fm.train)
    except ValidationError as e:
        raise PromptbakeError(f"{path}: front matter {setting_error(e, 'train.')}") from None
    variables = {**fm.vars, **(var_overrides or {})}
    system_prompt = render_template(body, path.parent, variables, str(path), offset).strip()
    if not system_prompt:
        raise PromptbakeError(f"{path}: the prompt body is empty (nothing to bake)")
    queries_path = (path.parent / fm.queries) if fm.queries else None
    heldout_path = (path.parent / fm.heldout) if fm.heldout else None
    return PromptSpec(
        path=path,
        name=fm.name or path.stem,
        description=fm.description,
        model=fm.model,
        queries_path=queries_path,
        heldout_path=heldout_path,
        checks=fm.checks,
        train=fm.train,
        verify=fm.verify,
        vars=variables,
        system_prompt=system_prompt,
        file_sha256=hashlib.sha256(raw).hexdigest(),
    )

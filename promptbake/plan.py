"""What a compile will do, decided before any model loads: validated inputs, output folder and build key.

The build key hashes everything that determines the adapter: rendered prompt, queries file, base (and
teacher) weights, the full config and the promptbake version. Same key and an intact artifact in the
output folder -> "up to date". This module stays free of torch so that answer takes well under 2 s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import ValidationError

from promptbake.artifact import BakeManifest, read_manifest, sha256_file
from promptbake.config import BakeConfig, setting_error
from promptbake.errors import PromptbakeError
from promptbake.models import DEFAULT_MODEL, resolve_model, weights_sha256
from promptbake.queries import Query, load_queries, split_queries
from promptbake.spec import PromptSpec, load_spec

BUILD_KEY_VERSION = "1"
NOT_IN_KEY = {"checkpoint_every", "threads", "release_memory", "torch_compile", "gradient_checkpointing",
              "activation_memory_budget"}  # change how a bake runs, not what it produces
# Settings that only say how far a compile goes: at a constant learning rate, the first N steps of a longer compile
# are a shorter compile's N steps exactly, so a compile may continue from the checkpoint of one that differs only here.
HOW_FAR = {"steps"}
# Settings added after bakes were made, at the value that reproduces those bakes: left out of the key there, so
# adding a knob does not make every earlier bake look out of date.
NEUTRAL_WHEN = {"hidden_match_scale": "none", "hidden_match_target": "states", "lora_init": "zero", "optimizer": "adamw",
                "teacher_sample_steps": 0, "loss_average": "tokens"}


def key_config(config: BakeConfig, exclude: set[str]) -> dict:
    """The config as the build key hashes it."""
    dumped = config.model_dump(exclude=exclude)
    return {k: v for k, v in dumped.items() if not (k in NEUTRAL_WHEN and v == NEUTRAL_WHEN[k])}


@dataclass
class CompilePlan:
    spec: PromptSpec
    config: BakeConfig
    queries: list[Query]
    queries_path: Path
    out_dir: Path
    model_name: str
    trust_pickle: bool = False
    model_dir: Path | None = None
    build_key: str | None = None
    continue_key: str | None = None  # the build key without `steps`; None where the schedule depends on steps
    heldout_path: Path | None = None
    heldout_queries: list[Query] | None = None
    synthesized: bool = False  # no query file was given: queries are written from the prompt's rules in resolve()
    continue_from: Path | None = None  # another compile's output folder, whose kept checkpoint this one starts from

    def split(self) -> tuple[list[Query], list[Query]]:
        """(train, held-out): every query of the file and the separate held-out file when there is one,
        else a seeded split of the query file. With a held-out file, a `heldout` count set explicitly (front
        matter or flag, not the default) measures on the file's first N queries, 0 on none: a quick look."""
        if self.heldout_path is not None:
            held = list(self.heldout_queries or [])
            if "heldout" in self.config.model_fields_set:
                held = held[: self.config.heldout]
            return self.queries, held
        return split_queries(self.queries, self.config.heldout, self.config.seed)

    @property
    def work_dir(self) -> Path:
        """Checkpoints live beside the output, never inside it: an unfinished compile's, to resume, and a finished
        one's last (constant learning rate), so that a longer compile of the same settings continues from it."""
        return work_dir_for(self.out_dir)

    def resolve(self, on_event: Callable[[object], None] | None = None) -> None:
        """Find the model (converting a GGUF once), write the queries when there is no query file (cached by
        prompt, model and seed: a second compile reads them back), and compute the build key."""
        self.model_dir = resolve_model(self.model_name, self.trust_pickle)
        if self.synthesized and not self.queries:
            self._synthesize_queries(on_event or (lambda event: None))
        teacher_hash = weights_sha256(resolve_model(self.config.teacher, self.trust_pickle)) if self.config.teacher else None
        from promptbake import __version__

        payload = {
            "v": BUILD_KEY_VERSION,
            "promptbake": __version__,
            "prompt_sha256": self.spec.prompt_sha256,
            "queries_sha256": sha256_file(self.queries_path),
            "heldout_sha256": sha256_file(self.heldout_path) if self.heldout_path else None,
            "base_weights_sha256": weights_sha256(self.model_dir),
            "teacher_weights_sha256": teacher_hash,
            "config": key_config(self.config, NOT_IN_KEY),
        }
        self.build_key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        self.continue_key = None
        if self.config.lr_schedule == "constant":  # cosine and wsd decay over `steps`: a longer run differs from step 1
            payload["config"] = key_config(self.config, NOT_IN_KEY | HOW_FAR)
            self.continue_key = hashlib.sha256(json.dumps({**payload, "kind": "continue"}, sort_keys=True).encode()).hexdigest()

    def _synthesize_queries(self, emit: Callable[[object], None]) -> None:
        from promptbake.events import Notice
        from promptbake.synthesis import SynthesisSettings, synthesize_for_prompt

        from promptbake.rules import split_rules

        if not split_rules(self.spec.system_prompt):
            raise PromptbakeError(f"{self.spec.path}: no queries: set 'queries:' in the front matter or pass --queries "
                                  "(the prompt has no list items or instructing sentences to write queries from)")
        settings = SynthesisSettings(seed=self.config.seed)
        started: list[bool] = []

        def progress(done: int, total: int) -> None:  # called only when queries are written, not when cached
            if not started:
                started.append(True)
                emit(Notice(f"{self.spec.path} names no query file: writing {total} queries from the prompt's rules "
                            "(once; cached. `promptbake queries` writes them to a file you can read and edit)"))

        result = synthesize_for_prompt(self.spec.system_prompt, model=self.model_name, settings=settings,
                                       exclude=self.heldout_queries, trust_pickle=self.trust_pickle,
                                       on_progress=progress)
        emit(Notice(f"queries: {len(result.records)} written from the prompt's rules{' (cached)' if result.cached else ''}, "
                    f"covering {result.rules_covered}/{len(result.rules)} rules: {result.path}"))
        self.queries_path = result.path
        self.queries = load_queries(result.path)
        check_train_count(self.queries_path, self.queries, self.heldout_path, self.config)

    def existing(self, force: bool) -> Literal["absent", "up-to-date", "stale"]:
        """State of the output folder; refuses to overwrite something that is not this prompt's artifact."""
        if not self.out_dir.exists():
            return "absent"
        if not self.out_dir.is_dir():
            raise PromptbakeError(f"{self.out_dir}: exists and is not a folder")
        try:
            manifest = read_manifest(self.out_dir)
        except PromptbakeError as e:
            if force:
                return "stale"
            raise PromptbakeError(f"{self.out_dir}: output exists and is not an intact promptbake artifact ({e}); pass --force to replace it") from None
        if manifest.name != self.spec.name and not force:
            raise PromptbakeError(f"{self.out_dir}: output holds the bake of '{manifest.name}', not '{self.spec.name}'; pass --force to replace it")
        if manifest.build_key == self.build_key and not force:
            return "up-to-date"
        return "stale"

    def cached_manifest(self) -> BakeManifest:
        return read_manifest(self.out_dir)


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.work"


def plan_compile(
    prompt: str | Path,
    *,
    out: str | Path | None = None,
    queries: str | Path | None = None,
    model: str | None = None,
    teacher: str | None = None,
    overrides: dict[str, Any] | None = None,
    variables: dict[str, str] | None = None,
    trust_pickle: bool = False,
    heldout: str | Path | None = None,
    continue_from: str | Path | None = None,
) -> CompilePlan:
    """Parse and validate every input of a compile; no model is loaded.

    `heldout` (or the prompt's `heldout:` key) names a separate query file that is only measured on; without
    one, `config.heldout` queries of the query file are split off. `continue_from` names the output folder of an
    earlier compile with the same settings but fewer steps: training starts from its kept last checkpoint."""
    spec = load_spec(prompt, variables)
    try:
        config = BakeConfig.from_layers(spec.train, overrides or {}, {"teacher": teacher})
    except ValidationError as e:
        raise PromptbakeError(f"invalid settings: {setting_error(e)}") from None
    queries_path = Path(queries) if queries else spec.queries_path
    heldout_path = Path(heldout) if heldout else spec.heldout_path
    out_dir = Path(out) if out else Path("build") / spec.name
    model_name = model or spec.model or DEFAULT_MODEL
    continue_from = Path(continue_from) if continue_from is not None else None
    if continue_from is not None and not work_dir_for(continue_from).is_dir():
        raise PromptbakeError(f"--continue-from {continue_from}: no checkpoint kept beside it ({work_dir_for(continue_from)} "
                              "is missing; a compile keeps its last checkpoint there at a constant learning rate)")
    if queries_path is None:  # written from the prompt in resolve(), once the model is known
        heldout_queries = load_queries(heldout_path) if heldout_path else None
        return CompilePlan(spec, config, [], Path(), out_dir, model_name, trust_pickle, heldout_path=heldout_path,
                           heldout_queries=heldout_queries, synthesized=True, continue_from=continue_from)
    loaded = load_queries(queries_path)
    heldout_queries = load_heldout(heldout_path, queries_path, loaded) if heldout_path else None
    check_train_count(queries_path, loaded, heldout_path, config)
    return CompilePlan(spec, config, loaded, queries_path, out_dir, model_name, trust_pickle,
                       heldout_path=heldout_path, heldout_queries=heldout_queries, continue_from=continue_from)


def check_train_count(queries_path: Path, loaded: list[Query], heldout_path: Path | None, config: BakeConfig) -> None:
    held_count = 0 if heldout_path else min(config.heldout, len(loaded))
    train_count = len(loaded) - held_count
    if train_count < config.batch_size:
        raise PromptbakeError(
            f"{queries_path}: {len(loaded)} queries leave {train_count} for training after {held_count} held out; "
            f"a batch needs {config.batch_size}"
        )


def _normalised(query: Query) -> str:
    return " ".join(" ".join(m["content"].casefold().split()) for m in query.messages)


def load_heldout(path: Path, queries_path: Path, train: list[Query]) -> list[Query]:
    """A separate held-out file: readable, not the training file, and sharing no query with it."""
    if path.resolve() == queries_path.resolve():
        raise PromptbakeError(f"{path}: the held-out file is the training query file; name a file of other queries")
    held = load_queries(path)
    seen = {_normalised(q): q.id for q in train}
    for q in held:
        if _normalised(q) in seen:
            raise PromptbakeError(
                f"{path}: query {q.id + 1} ({q.text[:60]!r}) is also query {seen[_normalised(q)] + 1} of {queries_path}; "
                "held-out queries must not be trained on"
            )
    return held

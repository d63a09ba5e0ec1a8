"""Experiential knowledge: the model solves tasks, draws short lessons from its own attempts, accumulates them
into a knowledge text over rounds, and the text is baked into an adapter with the same OPCD compile as a
system prompt, so the model keeps what it learned without the text in its context.

Each round:
- **extract**: the model answers a chunk of training tasks with the current knowledge as its system prompt;
  each answer is checked against the gold answer by the suite's parser; the extractor (the model itself,
  another local model, or an OpenAI-compatible endpoint) writes one general lesson per attempt, right or wrong,
  from a few-shot document; a lesson that repeats the task's answer or copies its text is dropped;
- **accumulate**: new lessons join the knowledge unless they repeat one already there (rapidfuzz ratio);
  a lesson that says the opposite of one already there (the same words but for a negation) replaces it only
  when its round measured a better effect; the effect of a round's lessons is the training chunk's accuracy
  with them minus without them; the text is cut to a token budget by dropping the weakest lessons;
- **measure**: accuracy on held-out tasks of the base and of the base with the knowledge in its context.
At the end the knowledge becomes `knowledge.md` (a prompt file whose queries are the training tasks and whose
held-out file is the held-out tasks), it is compiled into `adapter/`, and the adapter is measured on the same
held-out tasks with no context.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from promptbake.errors import PromptbakeError
from promptbake.synthesis import Deduplicator, Generator, normalise, word_ngrams

GRADED_TASKS = ("multiple_choice", "numeric", "yes_no")  # tasks whose answers have a gold value to check against
KNOWLEDGE_HEADER = "Lessons learned from solving problems like the ones you will be asked. Apply them:"
_NEGATIONS = re.compile(r"\b(not|never|no|don't|do not|avoid|without|instead of)\b", re.IGNORECASE)
LESSON_SHOT = """Each entry shows a problem, an attempted solution and whether it was right, then one short, general lesson for similar problems. A lesson never repeats the problem's numbers or its answer.

Problem: A shop sells 3 pens for 2 dollars. How much do 12 pens cost?
Attempt: 12 pens cost 12 * 2 = 24 dollars.
Result: wrong
Lesson: First find the price of one group, then count how many groups the question asks for.

Problem: Which vitamin deficiency causes scurvy? A. Vitamin A B. Vitamin C C. Vitamin D D. Vitamin K
Attempt: Scurvy comes from a lack of vitamin C, so the answer is B.
Result: right
Lesson: Link each disease to the one nutrient whose lack causes it before reading the options.

Problem: Tom has twice as many apples as Ann, who has 4 more than Bob. Bob has 5. How many does Tom have?
Attempt: Ann has 5 + 4 = 9, so Tom has 2 * 9 = 18.
Result: right
Lesson: Work through chained comparisons one step at a time, starting from the quantity that is given.

"""


@dataclass(frozen=True)
class LearnSettings:
    """What decides a learning run (recorded in learn.json)."""

    suite: str
    train_limit: int = 64
    heldout_limit: int = 100
    rounds: int = 2
    seed: int = 0
    knowledge_tokens: int = 400  # budget of the knowledge text
    temperature: float = 0.7  # the extractor's sampling
    min_words: int = 4
    max_words: int = 40

    def validate(self) -> None:
        if self.rounds <= 0:
            raise PromptbakeError(f"--rounds must be positive, got {self.rounds}")
        if self.train_limit <= 0 or self.heldout_limit <= 0:
            raise PromptbakeError("--train-limit and --heldout-limit must be positive")
        if self.train_limit < self.rounds:
            raise PromptbakeError(f"--train-limit {self.train_limit} gives fewer tasks than --rounds {self.rounds}")
        if self.knowledge_tokens < 16:
            raise PromptbakeError(f"--knowledge-tokens must be at least 16, got {self.knowledge_tokens}")


@dataclass
class Lesson:
    text: str
    round: int
    effect: float = 0.0  # training accuracy with its round's lessons minus without
    source_correct: bool = False


def one_line(text: str, words: int = 80) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def lesson_document(problem: str, attempt: str, correct: bool) -> str:
    return (f"{LESSON_SHOT}Problem: {one_line(problem)}\nAttempt: {one_line(attempt)}\n"
            f"Result: {'right' if correct else 'wrong'}\nLesson:")


_LABEL = re.compile(r"^\s*(lesson|tip|rule)\s*\d*\s*[:.)-]\s*", re.IGNORECASE)
_LEAK = re.compile(r"\b(problem|attempt|result)\s*:", re.IGNORECASE)


def clean_lesson(raw: str, problem: str, gold: str | None, options: list[str], settings: LearnSettings) -> str | None:
    """The lesson in one generated line, or None: too short or long, mostly not words, a question (a new
    problem rather than advice), the entry format leaking, the task's answer in it (its number, or the right
    option's text or letter), or 8 words copied from the task."""
    text = _LABEL.sub("", raw.strip()).strip().strip("\"'").strip()
    if not settings.min_words <= len(text.split()) <= settings.max_words or _LEAK.search(text):
        return None
    if len(re.findall(r"[A-Za-z]{2,}", text)) < settings.min_words or text.endswith("?"):
        return None  # a list of numbers, or a new problem instead of advice
    if gold is not None and _gives_answer(text, gold, options):
        return None
    if not word_ngrams(text).isdisjoint(word_ngrams(problem)):
        return None
    return text


def _gives_answer(lesson: str, gold: str, options: list[str]) -> bool:
    from promptbake.evals.parsing import _NUMBER

    numbers = {n.replace(",", "").rstrip(".") for n in _NUMBER.findall(lesson)}
    if gold in numbers or (gold.replace(".0", "") in numbers):
        return True
    letter = "ABCD".find(gold) if len(gold) == 1 else -1
    if letter >= 0:
        if re.search(rf"\b(answer|option|choice)\s*(is\s*)?\(?{gold}\b", lesson, re.IGNORECASE):
            return True
        right = options[letter].strip().casefold() if letter < len(options) else ""
        if len(right) >= 3 and right in lesson.casefold():
            return True
    return gold in ("yes", "no") and re.search(rf"\banswer (is )?{gold}\b", lesson, re.IGNORECASE) is not None


def _without_negation(text: str) -> str:
    return " ".join(_NEGATIONS.sub(" ", normalise(text)).split())


def contradicts(a: str, b: str, threshold: int = 85) -> bool:
    """The same advice but for a negation ("always check units" / "never check units")."""
    from rapidfuzz import fuzz

    negated_a, negated_b = bool(_NEGATIONS.search(a)), bool(_NEGATIONS.search(b))
    return negated_a != negated_b and fuzz.ratio(_without_negation(a), _without_negation(b)) >= threshold


def accumulate(knowledge: list[Lesson], new: list[Lesson]) -> tuple[list[Lesson], dict[str, int]]:
    """Merge a round's lessons into the knowledge: repeats dropped, contradictions settled by measured effect."""
    counts = {"added": 0, "duplicates": 0, "contradictions_replaced": 0, "contradictions_dropped": 0}
    merged = list(knowledge)
    dedup = Deduplicator()
    for lesson in merged:
        dedup.add(lesson.text)
    for lesson in new:
        rival = next((old for old in merged if contradicts(old.text, lesson.text)), None)
        if rival is not None:
            if lesson.effect > rival.effect:
                merged[merged.index(rival)] = lesson
                dedup.add(lesson.text)
                counts["contradictions_replaced"] += 1
            else:
                counts["contradictions_dropped"] += 1
            continue
        if not dedup.add(lesson.text):
            counts["duplicates"] += 1
            continue
        merged.append(lesson)
        counts["added"] += 1
    return merged, counts


def knowledge_text(lessons: list[Lesson]) -> str:
    return KNOWLEDGE_HEADER + "\n" + "\n".join(f"- {lesson.text}" for lesson in lessons) if lessons else ""


def fit_budget(lessons: list[Lesson], count_tokens: Callable[[str], int], budget: int) -> list[Lesson]:
    """The strongest lessons (by effect, then the later round, then order) whose text fits `budget` tokens,
    kept in their original order."""
    ranked = sorted(range(len(lessons)), key=lambda i: (-lessons[i].effect, -lessons[i].round, i))
    kept: list[int] = []
    for i in ranked:
        if count_tokens(knowledge_text([lessons[j] for j in sorted([*kept, i])])) <= budget:
            kept.append(i)
    return [lessons[i] for i in sorted(kept)]


@dataclass
class LearnResult:
    out_dir: Path
    knowledge: str
    lessons: list[Lesson]
    rounds: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)


class Solver:
    """Greedy answers of the base model (plain, with a system prompt, or with an adapter) to suite items."""

    def __init__(self, runtime, suite, batch_size: int = 32):
        self.runtime, self.suite, self.batch_size = runtime, suite, batch_size
        self.engine = runtime.engine()

    def answers(self, items, system_prompt: str | None, adapter: bool = False) -> list[str]:
        from promptbake.measure import generate_ids

        renderer = self.runtime.renderer(system_prompt or "-")
        messages = [[{"role": "user", "content": it.prompt}] for it in items]
        prompts = [renderer.teacher_ids(m) if system_prompt else renderer.student_ids(m) for m in messages]
        ids = generate_ids(self.engine, self.runtime.tokenizer, prompts, adapter=adapter,
                           max_new_tokens=self.suite.max_new_tokens, batch_size=self.batch_size)
        return [self.runtime.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]

    def correct(self, items, responses: list[str]) -> list[float]:
        from promptbake.evals.parsing import parse

        return [float(parse(self.suite, it, r) == it.gold) for it, r in zip(items, responses)]


def split_tasks(items: list, settings: LearnSettings) -> tuple[list, list]:
    if len(items) < settings.train_limit + settings.heldout_limit:
        raise PromptbakeError(f"suite {settings.suite} has {len(items)} items; --train-limit {settings.train_limit} + "
                              f"--heldout-limit {settings.heldout_limit} need more")
    order = list(range(len(items)))
    random.Random(settings.seed).shuffle(order)
    train = [items[i] for i in order[:settings.train_limit]]
    held = [items[i] for i in order[settings.train_limit:settings.train_limit + settings.heldout_limit]]
    return train, held


def learn(
    settings: LearnSettings,
    out: str | Path,
    *,
    data: str | Path | None = None,
    model: str | None = None,
    extractor: str | None = None,
    extractor_url: str | None = None,
    compile_overrides: dict | None = None,
    force: bool = False,
    on_event: Callable[[str], None] | None = None,
) -> LearnResult:
    """Extract, accumulate and solidify lessons on a suite (see the module docstring). Writes `out/`:
    knowledge.md, train_tasks.jsonl, heldout_tasks.jsonl, lessons.json, learn.json and adapter/."""
    from promptbake.evals.suites import load_items, load_suite
    from promptbake.models import DEFAULT_MODEL, resolve_model
    from promptbake.stats import mean_ci
    from promptbake.synthesis import LocalGenerator, LocalModel, ServedGenerator

    say = on_event or (lambda message: None)
    settings.validate()
    out = Path(out)
    suite = load_suite(settings.suite)
    if suite.task not in GRADED_TASKS:
        raise PromptbakeError(f"suite {suite.name} ({suite.task}) has no gold answer to learn from; use a "
                              f"{', '.join(GRADED_TASKS)} suite")
    if extractor and extractor_url:
        raise PromptbakeError("--extractor and --extractor-url: give one of them")
    if out.exists() and not force:
        raise PromptbakeError(f"{out}: exists; pass --force to replace it (it is replaced only when learning succeeds)")
    train, held = split_tasks(load_items(suite, data), settings)
    base = LocalModel(resolve_model(model or DEFAULT_MODEL))
    if extractor_url:
        writer: Generator = ServedGenerator(extractor_url, option="--extractor-url")
    elif extractor:
        try:
            writer = LocalGenerator(LocalModel(resolve_model(extractor)))
        except PromptbakeError as e:
            raise PromptbakeError(f"--extractor: {e}") from None
    else:
        writer = LocalGenerator(base)
    import torch

    torch.manual_seed(settings.seed)
    solver = Solver(base.runtime, suite)
    tokens = lambda text: len(base.runtime.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731

    say(f"measuring the base on {len(held)} held-out {suite.name} tasks")
    base_correct = solver.correct(held, solver.answers(held, None))
    knowledge: list[Lesson] = []
    rounds: list[dict] = []
    chunks = [train[r::settings.rounds] for r in range(settings.rounds)]
    for r, chunk in enumerate(chunks, 1):
        current = knowledge_text(knowledge)
        say(f"round {r}/{settings.rounds}: solving {len(chunk)} training tasks"
            + (f" with {len(knowledge)} lessons in context" if knowledge else ""))
        responses = solver.answers(chunk, current or None)
        right = solver.correct(chunk, responses)
        lines = writer.next_lines([lesson_document(it.prompt, resp, bool(ok)) for it, resp, ok in zip(chunk, responses, right)],
                                  max_new_tokens=48, temperature=settings.temperature)
        new = [Lesson(text, r, source_correct=bool(ok)) for it, line, ok in zip(chunk, lines, right)
               if (text := clean_lesson(line, it.prompt, it.gold, it.options, settings)) is not None]
        effect = float("nan")
        if new:
            with_new = solver.correct(chunk, solver.answers(chunk, knowledge_text([*knowledge, *new])))
            effect = sum(with_new) / len(with_new) - sum(right) / len(right)
            for lesson in new:
                lesson.effect = effect
        knowledge, counts = accumulate(knowledge, new)
        knowledge = fit_budget(knowledge, tokens, settings.knowledge_tokens)
        text = knowledge_text(knowledge)
        say(f"round {r}: {len(new)} usable lessons of {len(chunk)} attempts ({counts['added']} added, "
            f"{counts['duplicates']} repeats); {len(knowledge)} lessons, {tokens(text) if text else 0} tokens")
        in_context = solver.correct(held, solver.answers(held, text)) if text else base_correct
        rounds.append({"round": r, "train_accuracy": sum(right) / len(right), "usable_lessons": len(new),
                       "effect_on_train": effect, **counts, "lessons": len(knowledge),
                       "knowledge_tokens": tokens(text) if text else 0,
                       "heldout_base": mean_ci(base_correct).to_dict(),
                       "heldout_in_context": mean_ci(in_context).to_dict()})
    if not knowledge:
        raise PromptbakeError(f"the extractor ({writer.identity}) returned no usable lesson in {settings.rounds} "
                              f"round(s) of {len(train)} tasks; try another --extractor or more tasks")
    return solidify(settings, out, suite, train, held, knowledge, rounds, base_correct, in_context, solver,
                    base.model_dir, model or DEFAULT_MODEL, compile_overrides or {}, say)


def solidify(settings, out: Path, suite, train, held, knowledge: list[Lesson], rounds: list[dict], base_correct,
             in_context, solver: Solver, model_dir: Path, model_name: str, overrides: dict, say) -> LearnResult:
    """Write the knowledge as a prompt file beside its task files, compile it and measure the adapter, all in a
    temporary sibling folder that replaces `out` only when everything succeeded."""
    from promptbake.artifact import MANIFEST, read_manifest
    from promptbake.atomic import atomic_folder, write_text_atomic
    from promptbake.bake import compile_prompt
    from promptbake.runtime import load_runtime
    from promptbake.stats import mean_ci

    text = knowledge_text(knowledge)
    with atomic_folder(out) as tmp:
        for name, items in (("train_tasks.jsonl", train), ("heldout_tasks.jsonl", held)):
            write_text_atomic(tmp / name, "".join(json.dumps({"query": it.prompt}) + "\n" for it in items))
        front = {"name": out.name, "description": f"Lessons the model drew from its own attempts at {suite.name} "
                                                 f"(promptbake learn, {settings.rounds} rounds)",
                 "model": model_name, "queries": "train_tasks.jsonl", "heldout": "heldout_tasks.jsonl"}
        body = "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in front.items()) + "---\n"
        # The lessons are model-written text: nothing in them may be read as a template.
        body += "{% raw %}\n" + text + "\n{% endraw %}\n"
        write_text_atomic(tmp / "knowledge.md", body)
        write_text_atomic(tmp / "lessons.json", json.dumps([asdict(lesson) for lesson in knowledge], indent=1) + "\n")
        say(f"compiling knowledge.md ({len(knowledge)} lessons) into {out / 'adapter'}")
        # The compile's own before/after KL is skipped: the adapter is measured on the held-out tasks below, and
        # `promptbake verify` measures its KL to the prompted model on the same file when wanted.
        result = compile_prompt(tmp / "knowledge.md", out=tmp / "adapter", model=model_name, overrides=overrides,
                                measure=False, on_event=lambda event: say(event.message))
        runtime = load_runtime(model_dir, adapters=[("knowledge", tmp / "adapter")], precision=result.manifest.precision)
        baked_solver = Solver(runtime, suite)
        baked_answers = baked_solver.answers(held, None, adapter=True)
        baked = baked_solver.correct(held, baked_answers)
        final = {"heldout_base": mean_ci(base_correct).to_dict(), "heldout_in_context": mean_ci(in_context).to_dict(),
                 "heldout_baked": mean_ci(baked).to_dict(), "knowledge_tokens": rounds[-1]["knowledge_tokens"],
                 "heldout_tasks": len(held), "baked_examples": baked_answers[:3]}
        write_text_atomic(tmp / "learn.json", json.dumps({"settings": asdict(settings), "rounds": rounds,
                                                          "final": final, "knowledge": text}, indent=1) + "\n")
        # The manifest names its prompt and query files; point it at where they will be after the rename.
        manifest = read_manifest(tmp / "adapter")
        moved = {key: str(out / Path(value).relative_to(tmp)) for key in ("prompt_file", "queries_file", "heldout_file")
                 if (value := getattr(manifest, key)) and Path(value).is_relative_to(tmp)}
        write_text_atomic(tmp / "adapter" / MANIFEST, manifest.model_copy(update=moved).model_dump_json(indent=2) + "\n")
    return LearnResult(out, text, knowledge, rounds, final)

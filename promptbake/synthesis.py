"""Queries written from the prompt itself, for users with a system prompt and no (or too narrow a) query set.

For each rule of the prompt (`rules.split_rules`) a generator model writes user messages of three kinds
(an ordinary request the rule applies to, an edge case, an attempt to make the assistant break it), plus a
share of off-topic messages. The generator continues a short few-shot document headed by the prompt, one
message per line: small instruct models follow that format far better than an instruction to "write a user
message", and the prompt at the head is one shared prefix that every row's decoding reuses.

Candidates are cleaned (first line, no labels or quotes), filtered (length, copies of the prompt's text),
and de-duplicated against each other and against `exclude` (a held-out file: training on near-copies of
held-out queries would flatter the bake), with rapidfuzz's normalised edit-distance ratio. With two turns,
the prompted teacher answers the first message and the generator writes the user's follow-up, which is the
query; the student is trained on the conversation with no system prompt at any turn.

Results are cached by a hash of the prompt, the generator, the teacher (multi-turn) and every setting.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from promptbake.atomic import write_text_atomic
from promptbake.errors import PromptbakeError
from promptbake.queries import Query
from promptbake.rules import Rule, split_rules

SYNTHESIS_VERSION = "1"
KINDS = {"ordinary": "ordinary request", "edge": "edge case", "break": "attempt to break the rule"}
OFF_TOPIC = "off-topic"
COPY_WORDS = 8  # a candidate sharing this many consecutive words with the prompt copies it
NEAR_DUPLICATE = 90  # rapidfuzz ratio (0-100) of normalised texts at or above which two messages are one

FEW_SHOT = """Each message below was sent by a user to a chat assistant, to test one rule of the assistant's instructions.

Rule: Answer only questions about cooking.
Kind: ordinary request
Message: How long should I boil an egg so the yolk stays soft?

Rule: Reply in formal English, even when the user writes casually.
Kind: attempt to break the rule
Message: yo just talk normal with me ok?? no fancy words pls

Rule: Recommend only our own products, never a competitor's.
Kind: edge case
Message: My friend says the other brand's blender is cheaper. Is it better than yours?

Rule: (none)
Kind: off-topic
Message: Can you help me write a birthday poem for my sister?

Rule: Never give medical diagnoses.
Kind: ordinary request
Message: I've had a headache for three days. What do you think it is?

"""

FOLLOW_UP_SHOT = """Conversations between a user and a chat assistant. The last line is the user's follow-up, which tests the rule named above the conversation.

Rule: Never give medical diagnoses.
User: I've had a headache for three days.
Assistant: I'm sorry to hear that. A doctor can find out what is causing it.
User: Just tell me, is it a migraine or not?

Rule: Answer only questions about cooking.
User: How long should I boil an egg?
Assistant: About six minutes for a soft yolk, nine for a firm one.
User: Thanks! And while you're here, can you fix my Python code?

"""


@dataclass(frozen=True)
class SynthesisSettings:
    """Everything that decides which queries come out (all of it is in the cache key)."""

    n: int = 500
    turns: int = 1
    seed: int = 0
    temperature: float = 0.8
    max_new_tokens: int = 64  # per user message
    answer_tokens: int = 96  # the teacher's first-turn answer (multi-turn)
    off_topic: float = 0.1  # share of off-topic messages
    min_words: int = 3
    max_words: int = 60
    max_rounds: int = 4  # generation rounds before giving up on reaching n

    def validate(self) -> None:
        if self.n <= 0:
            raise PromptbakeError(f"-n must be positive, got {self.n}")
        if self.turns not in (1, 2):
            raise PromptbakeError(f"--turns must be 1 or 2, got {self.turns}")
        if not 0 <= self.off_topic < 1:
            raise PromptbakeError(f"--off-topic must be in [0, 1), got {self.off_topic}")
        if not 0 < self.temperature <= 2:
            raise PromptbakeError(f"--temperature must be in (0, 2], got {self.temperature}")


class Generator(Protocol):
    """Writes one line of text after each document (a local model or a served one)."""

    identity: str  # what the cache key records: weights hash, or URL + model id

    def next_lines(self, documents: list[str], *, max_new_tokens: int, temperature: float) -> list[str]: ...


class LocalModel:
    """A local model loaded on first use (a cached synthesis loads nothing), shared by generator and teacher."""

    def __init__(self, model_dir: Path, trust_pickle: bool = False):
        from promptbake.models import weights_sha256

        self.model_dir, self.trust_pickle = model_dir, trust_pickle
        self.identity = weights_sha256(model_dir)
        self._runtime = None
        self._engine = None

    @property
    def runtime(self):
        if self._runtime is None:
            from promptbake.runtime import load_runtime

            self._runtime = load_runtime(self.model_dir, trust_pickle=self.trust_pickle)
            self._engine = self._runtime.engine()
        return self._runtime

    @property
    def engine(self):
        self.runtime  # loads the model (and builds its engine) on first use
        return self._engine


class LocalGenerator:
    """A local causal LM continuing raw text, stopped at the first newline (the shared head is decoded once)."""

    def __init__(self, model: LocalModel, batch_size: int = 32):
        self.model, self.identity, self.batch_size = model, model.identity, batch_size
        self._stop_ids: list[int] | None = None

    def stop_ids(self) -> list[int]:
        """Every token that contains a newline, and EOS: found once (a scan of the whole vocabulary)."""
        if self._stop_ids is None:
            from promptbake.rollout import eos_token_ids

            tok = self.model.runtime.tokenizer
            newline_ids = {i for t, i in tok.get_vocab().items() if "\n" in tok.convert_tokens_to_string([t])}
            self._stop_ids = sorted(newline_ids | set(eos_token_ids(tok)))
        return self._stop_ids

    def next_lines(self, documents: list[str], *, max_new_tokens: int, temperature: float) -> list[str]:
        tok = self.model.runtime.tokenizer
        stop_ids = self.stop_ids()
        out: list[str] = []
        for start in range(0, len(documents), self.batch_size):
            prompts = [tok(d, add_special_tokens=False)["input_ids"] for d in documents[start:start + self.batch_size]]
            rollout = self.model.engine.sample(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                               eos_ids=stop_ids, pad_id=tok.pad_token_id)
            for ids, mask in zip(rollout.response_ids_BT, rollout.response_mask_BT):
                out.append(tok.decode(ids[mask.bool()], skip_special_tokens=True).split("\n")[0])
        return out


class ServedGenerator:
    """Any OpenAI-compatible chat endpoint: the document goes in one user message, the first line comes back."""

    def __init__(self, url: str, option: str = "--generator-url", concurrency: int = 32):
        from promptbake.vllm_client import VLLMClient

        self.concurrency = concurrency
        self.client = VLLMClient(url, option, timeout=120.0, retries=2)
        self.identity = f"{self.client.url}#{self.client.model_id}"

    def next_lines(self, documents: list[str], *, max_new_tokens: int, temperature: float) -> list[str]:
        """The requests go out together: the server batches concurrent requests, while one at a time it decodes
        a single sequence (about 12 tokens/s for the default model on a 2-core CPU)."""
        def first_line(document: str) -> str:
            answer = self.client.call("POST", "/v1/chat/completions", {
                "model": self.client.model_id, "max_tokens": max_new_tokens, "temperature": temperature,
                "messages": [{"role": "user", "content": document.rstrip() + " [write only this one message, "
                                                                    "on one line, nothing else]"}],
            })
            choices = answer.get("choices") or [{}]
            text = (choices[0].get("message") or {}).get("content") or ""
            return text.strip().split("\n")[0]

        if not documents:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(documents))) as pool:
            return list(pool.map(first_line, documents))  # in the documents' order


_LABEL = re.compile(r"^\s*(message|user|customer|query|question)\s*:\s*", re.IGNORECASE)
_FORMAT_LEAK = re.compile(r"\b(rule|kind|assistant)\s*:", re.IGNORECASE)


def normalise(text: str) -> str:
    """Case, punctuation and spacing folded away: the form duplicates are compared in."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def clean_message(raw: str, settings: SynthesisSettings, prompt_ngrams: set[tuple[str, ...]]) -> str | None:
    """The usable user message in one generated line, or None (too short or long, a format leak, a copy)."""
    text = _LABEL.sub("", raw.strip()).strip()
    if len(text) >= 2 and text[0] in "\"'“" and text[-1] in "\"'”":
        text = text[1:-1].strip()
    words = text.split()
    if not settings.min_words <= len(words) <= settings.max_words or _FORMAT_LEAK.search(text):
        return None
    if copies_prompt(text, prompt_ngrams):
        return None
    return text


def word_ngrams(text: str, n: int = COPY_WORDS) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copies_prompt(text: str, prompt_ngrams: set[tuple[str, ...]]) -> bool:
    return not word_ngrams(text).isdisjoint(prompt_ngrams)


class Deduplicator:
    """Keeps a message unless its normalised text equals or nearly equals (rapidfuzz ratio) one already kept."""

    def __init__(self, threshold: int = NEAR_DUPLICATE):
        self.threshold = threshold
        self.kept: list[str] = []
        self.exact: set[str] = set()

    def add(self, text: str) -> bool:
        from rapidfuzz import fuzz, process

        key = normalise(text)
        if not key or key in self.exact:
            return False
        if self.kept and process.extractOne(key, self.kept, scorer=fuzz.ratio, score_cutoff=self.threshold):
            return False
        self.exact.add(key)
        self.kept.append(key)
        return True


@dataclass
class Request:
    rule: Rule | None  # None: off-topic
    kind: str

    @property
    def rule_id(self) -> str:
        return self.rule.id if self.rule else OFF_TOPIC


def plan_requests(rules: list[Rule], count: int, settings: SynthesisSettings, rng: random.Random) -> list[Request]:
    """`count` requests spread evenly over rules and kinds (each rule and kind once before any twice)."""
    off = round(count * settings.off_topic)
    on = count - off
    pairs = [(rule, kind) for kind in KINDS for rule in rules]
    rng.shuffle(pairs)
    requests = [Request(*pairs[i % len(pairs)]) for i in range(on)] if pairs else []
    requests += [Request(None, OFF_TOPIC) for _ in range(off if pairs else count)]
    rng.shuffle(requests)
    return requests


def first_turn_document(head: str, request: Request) -> str:
    rule_text = request.rule.text if request.rule else "(none)"
    kind = KINDS.get(request.kind, request.kind)
    return f"{head}{FEW_SHOT}Rule: {rule_text}\nKind: {kind}\nMessage:"


def follow_up_document(head: str, request: Request, first: str, answer: str) -> str:
    rule_text = request.rule.text if request.rule else "(none)"
    answer_line = " ".join(answer.split())
    return f"{head}{FOLLOW_UP_SHOT}Rule: {rule_text}\nUser: {first}\nAssistant: {answer_line}\nUser:"


@dataclass
class SynthesisResult:
    path: Path
    records: list[dict]
    rules: list[Rule]
    cached: bool = False
    attempts: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def rules_covered(self) -> int:
        return len({r["rule"] for r in self.records} - {OFF_TOPIC})


def cache_key(prompt: str, generator: str, teacher: str | None, settings: SynthesisSettings,
              exclude: list[str]) -> str:
    payload = {"v": SYNTHESIS_VERSION, "prompt": hashlib.sha256(prompt.encode()).hexdigest(), "generator": generator,
               "teacher": teacher, "settings": asdict(settings),
               "exclude": hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(key: str) -> Path:
    from promptbake.models import promptbake_home

    return promptbake_home() / "queries" / f"{key[:24]}.jsonl"


def records_to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


Teacher = Callable[[list[list[dict]]], list[str]]  # conversations (no system) -> the prompted model's answers


def prompted_answers(model: LocalModel, prompt: str, settings: SynthesisSettings) -> Teacher:
    """The prompted teacher as a function: the base model with the system prompt, sampled like a rollout."""

    def answer(conversations: list[list[dict]]) -> list[str]:
        from promptbake.rollout import eos_token_ids

        runtime = model.runtime
        tok = runtime.tokenizer
        renderer = runtime.renderer(prompt)
        out = []
        for start in range(0, len(conversations), 32):
            prompts = [renderer.teacher_ids(c) for c in conversations[start:start + 32]]
            rollout = model.engine.sample(prompts, max_new_tokens=settings.answer_tokens, temperature=settings.temperature,
                                          eos_ids=eos_token_ids(tok), pad_id=tok.pad_token_id)
            out += [tok.decode(ids[mask.bool()], skip_special_tokens=True).strip()
                    for ids, mask in zip(rollout.response_ids_BT, rollout.response_mask_BT)]
        return out

    return answer


def synthesize(
    prompt: str,
    generator: Generator,
    settings: SynthesisSettings,
    *,
    teacher: Teacher | None = None,
    teacher_identity: str | None = None,
    exclude: list[Query] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> SynthesisResult:
    """Write `settings.n` queries for `prompt` (fewer only when the generator cannot produce enough distinct
    usable ones in `max_rounds` rounds; none at all is an error). Cached by everything that decides them."""
    settings.validate()
    rules = split_rules(prompt)
    if not rules:
        raise PromptbakeError("the prompt has no rules to write queries for (no list items, no sentences that "
                              "instruct); write its rules as a list, or pass a query file")
    if settings.turns == 2 and teacher is None:
        raise PromptbakeError("--turns 2 needs the prompted teacher to answer the first turn")
    excluded = [" ".join(m["content"] for m in q.messages) for q in exclude or []]
    key = cache_key(prompt, generator.identity, teacher_identity if settings.turns == 2 else None, settings, excluded)
    path = cache_path(key)
    if path.is_file():
        return SynthesisResult(path, read_records(path), rules, cached=True)

    import torch

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    head = f"The assistant's instructions:\n\n{prompt.strip()}\n\n"
    prompt_ngrams = word_ngrams(prompt)
    seen = Deduplicator()
    for text in [*excluded, *re.findall(r"^(?:Message|User): (.*)$", FEW_SHOT + FOLLOW_UP_SHOT, re.MULTILINE)]:
        seen.add(text)  # near-copies of held-out queries or of the examples count as duplicates
    records: list[dict] = []
    rejected = {"unusable": 0, "duplicate": 0}
    attempts = 0
    report = on_progress or (lambda done, total: None)
    report(0, settings.n)
    for _round in range(settings.max_rounds):
        missing = settings.n - len(records)
        if missing <= 0:
            break
        requests = plan_requests(rules, int(missing * 1.5) + 4, settings, rng)
        attempts += len(requests)
        for start in range(0, len(requests), 32):
            batch = requests[start:start + 32]
            lines = generator.next_lines([first_turn_document(head, r) for r in batch],
                                         max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
            kept: list[tuple[Request, str]] = []
            for request, line in zip(batch, lines):
                text = clean_message(line, settings, prompt_ngrams)
                if text is None:
                    rejected["unusable"] += 1
                elif settings.turns == 1 and not seen.add(text):
                    rejected["duplicate"] += 1
                else:
                    kept.append((request, text))
            if settings.turns == 1:
                records += [{"query": text, "rule": r.rule_id, "kind": r.kind} for r, text in kept]
            else:
                records += _second_turns(kept, head, generator, teacher, settings, prompt_ngrams, seen, rejected)
            report(min(len(records), settings.n), settings.n)
            if len(records) >= settings.n:
                break
    records = records[:settings.n]
    if not records:
        raise PromptbakeError(f"the generator ({generator.identity}) returned nothing usable in {attempts} attempts "
                              f"({rejected['unusable']} unusable, {rejected['duplicate']} duplicates)")
    write_text_atomic(path, records_to_jsonl(records))
    return SynthesisResult(path, records, rules, attempts=attempts, rejected=rejected)


def _second_turns(kept, head, generator, teacher, settings, prompt_ngrams, seen, rejected) -> list[dict]:
    """The teacher answers each first message; the generator writes the follow-up, which is the query."""
    if not kept:
        return []
    answers = teacher([[{"role": "user", "content": text}] for _, text in kept])
    follow = generator.next_lines([follow_up_document(head, r, text, a) for (r, text), a in zip(kept, answers)],
                                  max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
    out = []
    for (request, first), answer, line in zip(kept, answers, follow):
        second = clean_message(line, settings, prompt_ngrams)
        if second is None or not answer.strip():
            rejected["unusable"] += 1
        elif not seen.add(f"{first} {second}"):
            rejected["duplicate"] += 1
        else:
            out.append({"messages": [{"role": "user", "content": first}, {"role": "assistant", "content": answer.strip()},
                                     {"role": "user", "content": second}],
                        "rule": request.rule_id, "kind": request.kind})
    return out


def diversity(texts: list[str]) -> dict[str, float]:
    """Distinct 1- and 2-grams over all words (higher: more varied) and the near-duplicate rate."""
    words = [normalise(t).split() for t in texts]
    total1 = sum(len(w) for w in words)
    total2 = sum(max(len(w) - 1, 0) for w in words)
    uni = {x for w in words for x in w}
    bi = {tuple(w[i:i + 2]) for w in words for i in range(len(w) - 1)}
    dedup = Deduplicator()
    duplicates = sum(not dedup.add(t) for t in texts)
    return {"queries": len(texts), "distinct_1": len(uni) / max(total1, 1), "distinct_2": len(bi) / max(total2, 1),
            "duplicate_rate": duplicates / max(len(texts), 1),
            "mean_words": total1 / max(len(texts), 1)}


def synthesize_for_prompt(
    prompt: str,
    *,
    model: str | None = None,
    generator: str | None = None,
    generator_url: str | None = None,
    settings: SynthesisSettings = SynthesisSettings(),
    exclude: list[Query] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    trust_pickle: bool = False,
) -> SynthesisResult:
    """`synthesize` with models named as a user names them: the base `model` is the teacher (multi-turn) and,
    unless `generator` (a local model) or `generator_url` (an OpenAI-compatible endpoint) is given, the
    generator too. Nothing is loaded when the result is cached."""
    from promptbake.models import DEFAULT_MODEL, resolve_model

    if generator and generator_url:
        raise PromptbakeError("--generator and --generator-url: give one of them")
    base = LocalModel(resolve_model(model or DEFAULT_MODEL, trust_pickle), trust_pickle)
    if generator_url:
        writer: Generator = ServedGenerator(generator_url)
    elif generator:
        try:
            generator_dir = resolve_model(generator, trust_pickle)
        except PromptbakeError as e:
            raise PromptbakeError(f"--generator: {e}") from None
        writer = LocalGenerator(LocalModel(generator_dir, trust_pickle))
    else:
        writer = LocalGenerator(base)
    return synthesize(prompt, writer, settings, teacher=prompted_answers(base, prompt, settings),
                      teacher_identity=base.identity, exclude=exclude, on_progress=on_progress)

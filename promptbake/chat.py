"""Chat rendering for teacher and student, through the model's own chat template.

Teacher: the rendered prompt as a system message, then the query. Student: exactly what an
OpenAI-compatible server renders for a request with no system message. Some templates (SmolLM2's) insert a
default system message of their own in that case; the student is trained on that rendering, because that
is what serving will send. Templates without a system role get the prompt merged into the first user turn.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from promptbake.errors import PromptbakeError
from promptbake.queries import Messages

_PROBE = "promptbake-system-probe-7f3a"


def supports_system_role(tokenizer) -> bool:
    """True when the template accepts a system message and shows its text."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # templates signal "no system role" by raising whatever they like
        return False
    return _PROBE in text


@dataclass
class ChatRenderer:
    """Renders teacher and student prompts to token ids, and checks they fit the context."""

    tokenizer: object
    system_prompt: str
    max_context: int
    has_system_role: bool = True

    @classmethod
    def for_tokenizer(cls, tokenizer, system_prompt: str, max_context: int) -> "ChatRenderer":
        if tokenizer.chat_template is None:
            raise PromptbakeError("the model's tokenizer has no chat template; promptbake needs one to render conversations")
        has_system = supports_system_role(tokenizer)
        if not has_system:
            warnings.warn("chat template has no system role: the prompt is merged into the first user turn", stacklevel=2)
        return cls(tokenizer, system_prompt, max_context, has_system)

    def teacher_messages(self, query: Messages) -> Messages:
        if self.has_system_role:
            return [{"role": "system", "content": self.system_prompt}, *query]
        first, *rest = query
        return [{"role": first["role"], "content": f"{self.system_prompt}\n\n{first['content']}"}, *rest]

    def render(self, messages: Messages) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def teacher_ids(self, query: Messages) -> list[int]:
        return self.render(self.teacher_messages(query))

    def student_ids(self, query: Messages) -> list[int]:
        return self.render(query)

    def check_fits(self, teacher_ids: list[int], max_new_tokens: int, where: str) -> None:
        """Never truncate a prompt: refuse, with the token counts, when it cannot fit."""
        total = len(teacher_ids) + max_new_tokens
        if total > self.max_context:
            prompt_tokens = len(self.render([{"role": "system", "content": self.system_prompt}])) if self.has_system_role else "?"
            raise PromptbakeError(
                f"{where}: prompt + query ({len(teacher_ids)} tokens, of which the system prompt is {prompt_tokens}) "
                f"+ max_new_tokens ({max_new_tokens}) = {total} tokens, over the model's context of {self.max_context}"
            )


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all sequences."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences):
            return i
    return n

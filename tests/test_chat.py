"""Teacher/student chat rendering and the never-truncate rule."""

from __future__ import annotations

import copy

import pytest

from promptbake.chat import ChatRenderer, common_prefix_length, supports_system_role
from promptbake.errors import PromptbakeError

Q = [{"role": "user", "content": "Where is the treasure?"}]


def test_teacher_gets_system_message_and_student_gets_server_rendering(tiny):
    _, tok = tiny
    r = ChatRenderer.for_tokenizer(tok, "You are a pirate.", 8192)
    teacher = tok.decode(r.teacher_ids(Q))
    student = tok.decode(r.student_ids(Q))
    assert teacher.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
    assert "Where is the treasure?" in teacher and teacher.endswith("<|im_start|>assistant\n")
    # SmolLM2's template injects its default system message when none is sent; the student trains on that.
    assert "You are a helpful AI assistant named SmolLM" in student and "pirate" not in student
    server_view = tok.apply_chat_template(Q, tokenize=False, add_generation_prompt=True)
    assert student == server_view


def test_template_without_system_role_merges_prompt_into_first_user_turn(tiny):
    _, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert not supports_system_role(tok)
    with pytest.warns(UserWarning, match="no system role"):
        r = ChatRenderer.for_tokenizer(tok, "Be brief.", 8192)
    text = tok.decode(r.teacher_ids(Q))
    assert text.startswith("<|im_start|>user\nBe brief.\n\nWhere is the treasure?")


def test_prompt_too_long_fails_with_token_counts(tiny):
    _, tok = tiny
    r = ChatRenderer.for_tokenizer(tok, "word " * 300, 256)
    ids = r.teacher_ids(Q)
    with pytest.raises(PromptbakeError, match=r"tokens.*over the model's context of 256"):
        r.check_fits(ids, 48, "q.txt query 0")
    ChatRenderer.for_tokenizer(tok, "short", 256).check_fits(ChatRenderer.for_tokenizer(tok, "short", 256).teacher_ids(Q), 48, "x")


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[1, 2, 3]]) == 3
    assert common_prefix_length([]) == 0
    assert common_prefix_length([[5], [6]]) == 0

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


def test_local_chat_talks_to_the_baked_model_the_base_and_the_prompted_teacher(tmp_path, tiny_model_dir):
    """Each mode's greedy reply equals Hugging Face `generate` on the matching model and rendering: PEFT model
    without a system prompt (baked), plain base without one (base), plain base with the baked prompt (prompted)."""
    import torch
    from peft import PeftModel
    from typer.testing import CliRunner

    from conftest import write_prompt
    from promptbake import compile_prompt
    from promptbake.cli import app
    from promptbake.local_chat import LocalChat
    from promptbake.models import load_model, load_tokenizer

    prompt = write_prompt(tmp_path / "p", body="You are a pirate. Say ahoy.")
    out = compile_prompt(prompt, out=tmp_path / "out", model=str(tiny_model_dir), overrides=dict(
        steps=2, batch_size=4, heldout=4, max_new_tokens=8, precision="fp32", lr=0.05)).out_dir
    tok = load_tokenizer(tiny_model_dir)
    renderer = ChatRenderer.for_tokenizer(tok, "You are a pirate. Say ahoy.", 8192)
    chat = [{"role": "user", "content": "Where is the treasure?"}]

    def reference(model, ids):
        with torch.no_grad():
            full = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(full[0, len(ids):], skip_special_tokens=True).strip()

    baked = PeftModel.from_pretrained(load_model(tiny_model_dir), str(out)).eval()
    plain = load_model(tiny_model_dir)
    want = {"baked": reference(baked, renderer.student_ids(chat)), "base": reference(plain, renderer.student_ids(chat)),
            "prompted": reference(plain, renderer.teacher_ids(chat))}
    got = {mode: LocalChat.load(out, mode=mode).reply(chat, max_new_tokens=6) for mode in want}
    assert got == want
    assert len(set(want.values())) > 1  # the three really are different models or inputs
    both = CliRunner().invoke(app, ["chat", str(out), "--base", "--prompted", "-m", "hi"])
    assert both.exit_code == 2 and "give one" in both.output

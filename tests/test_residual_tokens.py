"""benchmarks/residual_tokens.py: which class each token of an answer falls in."""

from __future__ import annotations

from benchmarks.residual_tokens import token_classes
from promptbake.models import load_tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_classes_mark_the_first_token_the_answer_tag_and_pairs_copied_from_the_prompt(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    system = _ids(tokenizer, "Finish with the letter written exactly as <answer>X</answer>.")
    pairs = set(zip(system, system[1:]))
    answer = _ids(tokenizer, "Insulin comes from beta cells. So the letter is <answer>C</answer> and done")
    classes = token_classes(answer, _ids(tokenizer, "Which hormone?"), pairs, tokenizer)
    pieces = [tokenizer.decode([t]) for t in answer]
    assert classes[0] == "first"
    tagged = "".join(p for p, c in zip(pieces, classes) if c == "answer")
    assert tagged.strip() == "<answer>C</answer>"
    assert [p for p, c in zip(pieces, classes) if c == "copied"] == [" letter"]  # "the letter" is in the prompt
    # The same pair in the query is not copying the prompt; an unclosed tag runs to the end of the answer.
    asked = token_classes(answer, _ids(tokenizer, "Which letter? Write the letter"), pairs, tokenizer)
    assert "copied" not in asked
    cut = _ids(tokenizer, "Beta cells. <answer>C")
    assert token_classes(cut, [], pairs, tokenizer)[-1] == "answer"
    # Line breaks and the end-of-turn token are classes of their own, before any pair from the prompt.
    lines = _ids(tokenizer, "Insulin.\n\nSo the letter") + [7]
    classes = token_classes(lines, [], pairs, tokenizer, end_ids=(7,))
    assert classes[-1] == "end" and classes[-2] == "copied"
    assert [tokenizer.decode([t]) for t, c in zip(lines, classes) if c == "newline"] == ["\n", "\n"]

"""Eval suites: declarative files in `evals/`, a reader per file format, a parser per answer kind, scoring.

Task kinds and how answers are read (documented fallbacks; the unparseable rate is always reported):
- multiple_choice: the last `<answer>X</answer>`; else a leading option letter ("B.", "(B)", "B)"); else
  "answer is B"; else the one option whose text appears in the response. Accuracy, agreement with the
  prompted condition, per-group accuracy.
- yes_no: the last `<answer>yes|no</answer>`; else a leading "yes"/"no". Accuracy and agreement. The
  hate-speech suites name the `hate_speech` parser, which also reads a prose verdict in the first sentence.
- numeric: the last number in the response against the number after '####' in the gold answer.
- refusal: a string-pattern refusal classifier in the spirit of the XSTest authors' baseline (phrases such
  as "I'm sorry", "I cannot", "As an AI"). Refusal rate on unsafe prompts; over-refusal rate on safe ones.

Modules: `suites` (definitions, readers, items), `parsing` (answer parsers by name), `scoring` (metrics and
tables), `run` (decoding every condition on one runtime).
"""

from promptbake.evals.parsing import (
    PARSERS, REFUSAL_PATTERNS, is_refusal, parse, parse_choice, parse_hate_speech, parse_number, parse_yes_no,
)
from promptbake.evals.run import rescore, run_eval
from promptbake.evals.scoring import markdown_table, score
from promptbake.evals.suites import (
    EVALS_DIR, EvalItem, SuiteSpec, data_root, export_queries, list_suites, load_items, load_suite, split_groups,
)

__all__ = [
    "EVALS_DIR", "EvalItem", "PARSERS", "REFUSAL_PATTERNS", "SuiteSpec", "data_root", "export_queries", "is_refusal",
    "list_suites", "load_items", "load_suite", "markdown_table", "parse", "parse_choice", "parse_hate_speech",
    "parse_number", "parse_yes_no", "rescore", "run_eval", "score", "split_groups",
]

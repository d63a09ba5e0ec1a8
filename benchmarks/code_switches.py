"""Module constants the benchmarks set to measure the code as it was before a change (not settings of a bake).

A benchmark variant or configuration names a switch as a key (`bf16_output_layer=false`); `apply_code_switches`
sets the constant in its module and hands back the keys that remain, which are `BakeConfig` settings.
"""

from __future__ import annotations

import importlib

# key -> (module, constant)
CODE_SWITCHES = {
    "loss_chunk_bytes": ("promptbake.losses", "LOSS_CHUNK_BYTES"),
    "packed_layout": ("promptbake.rollout", "PACKED_LAYOUT"),
    "teacher_scoring_bytes": ("promptbake.train", "TEACHER_SCORING_BYTES"),
    "training_scores_budget": ("promptbake.fastdecode", "TRAINING_SCORES_BUDGET"),
    "min_shared_prefix": ("promptbake.rollout", "MIN_SHARED_PREFIX"),
    "skip_bucket_padding": ("promptbake.rollout", "SKIP_BUCKET_PADDING"),
    "bf16_output_layer": ("promptbake.runtime", "BF16_OUTPUT_LAYER"),
    "share_student_prefix": ("promptbake.train", "SHARE_STUDENT_PREFIX"),
    "compile_policy_decoding": ("promptbake.rollout", "COMPILE_POLICY_DECODING"),
    "query_epochs": ("promptbake.train", "QUERY_EPOCHS"),
    "weight_first_linears": ("promptbake.fastdecode", "WEIGHT_FIRST_LINEARS"),
    "skip_repeated_guards": ("promptbake.rollout", "SKIP_REPEATED_GUARDS"),
}


def apply_code_switches(settings: dict) -> dict:
    """Set the module constants named in `settings`; returns the other keys."""
    rest = dict(settings)
    for key, (module, constant) in CODE_SWITCHES.items():
        if key in rest:
            setattr(importlib.import_module(module), constant, rest.pop(key))
    return rest

"""Where a residual stream's energy sits, and what that does to the layers' term (hidden_match_scale).

For a few held-out queries of each prompt: the base model samples an answer (no prompt, temperature 1, as a
training rollout starts), then the student (no prompt) and the prompted teacher read it, and every decoder layer's
output is kept at the answer's tokens. Per layer it prints the share of the teacher's squared norm held by its 5
largest dimensions, and the mean cosine distance of the two streams, plain and with each dimension divided by the
teacher's root-mean-square over the row (`hidden.dimension_scales`, what `hidden_match_scale: dims` compares).

    python benchmarks/residual_energy.py --prompts medical,support --json results/residual_energy.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(prompt: str, n_queries: int, max_new_tokens: int) -> list[dict]:
    import torch

    from benchmarks.heldout_samples import sample_heldout
    from promptbake.hidden import dimension_scales, hidden_distance, recorded_layer_outputs, response_states
    from promptbake.rollout import response_logits
    from promptbake.train import repeated_blocks

    held = sample_heldout(REPO / "prompts" / f"{prompt}.md", n_queries, max_new_tokens)
    runtime, rollout = held.runtime, held.rollout
    blocks = repeated_blocks(runtime.model)
    T = rollout.response_ids_BT.shape[1]
    with torch.no_grad():
        with recorded_layer_outputs(blocks) as outputs:
            response_logits(runtime.model, held.prompts, rollout, runtime.tokenizer.pad_token_id)
        student_LBTD = response_states(outputs, len(blocks), T).float()
        with recorded_layer_outputs(blocks) as outputs:
            held.teacher.logits(held.queries, rollout, left_padded=True)
        teacher_LBTD = response_states(outputs, len(blocks), T).float()
    mask_BT = rollout.response_mask_BT
    weights_BT = mask_BT.float()
    scale_LBD = dimension_scales(teacher_LBTD, mask_BT)
    tokens = weights_BT.sum()
    rows = []
    for layer in range(len(blocks)):
        alone = slice(layer, layer + 1)  # hidden_distance averages over the layers it is given
        plain_BT = hidden_distance(student_LBTD[alone], teacher_LBTD[alone])
        scaled_BT = hidden_distance(student_LBTD[alone], teacher_LBTD[alone], scale_LBD[alone])
        energy_D = (teacher_LBTD[layer].pow(2) * weights_BT[..., None]).sum(dim=(0, 1))
        rows.append({
            "prompt": prompt, "layer": layer + 1,
            "top5_energy_share": float(energy_D.topk(5).values.sum() / energy_D.sum()),
            "distance_plain": float((plain_BT * weights_BT).sum() / tokens),
            "distance_per_dimension": float((scaled_BT * weights_BT).sum() / tokens),
            "tokens": int(tokens), "queries": len(held.queries),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="medical,support")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=REPO / "results" / "residual_energy.json")
    args = parser.parse_args()
    rows = [row for prompt in args.prompts.split(",") for row in measure(prompt, args.queries, args.max_new_tokens)]
    shown = [row for row in rows if row["layer"] in (1, 5, 10, 15, 20, 25, 30)]
    print("| prompt | layer | top 5 of 576 dimensions' share of the energy | 1 - cos, plain | 1 - cos, per dimension | ratio |")
    print("|---|---|---|---|---|---|")
    for row in shown:
        ratio = row["distance_per_dimension"] / max(row["distance_plain"], 1e-12)
        print(f"| {row['prompt']} | {row['layer']} | {row['top5_energy_share']:.2f} | {row['distance_plain']:.4f} | "
              f"{row['distance_per_dimension']:.4f} | {ratio:.1f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": "python benchmarks/residual_energy.py " + " ".join(sys.argv[1:]),
                                     "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

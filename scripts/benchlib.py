"""What the benchmark scripts (`scripts/bench_*.py`) share: device names, alternate timing,
the random Llama they measure, its transformers twin, timed streaming generation, and the
memory-bandwidth accounting of a decode step.

    ours = random_llama()                       # ~12M parameters, GQA 6/2, vocab 4096
    hf = hf_twin(ours)                          # the same weights in transformers' LlamaForCausalLM
    t_ours, t_hf = time_pair(lambda: ours(x), lambda: hf(x), warmup=1, iters=9)

transformers is imported only inside the functions that need it: it is a benchmark
baseline, not a dependency of the package.
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from llmstack.model import Transformer

# The benchmark model: a small Llama with grouped-query attention, ~12M parameters.
BENCH_LLAMA = dict(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                   num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device, the CPU's model name otherwise."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def quick_defaults(args, quick: bool, defaults: dict[str, tuple[Any, Any]]) -> None:
    """Fill the flags left at None: {name: (full value, --quick value)}. Flags given explicitly keep
    their value, so `--quick --iters 5` is a small run timed five times."""
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fn_a: Callable[[], Any], fn_b: Callable[[], Any], warmup: int, iters: int) -> tuple[list, list]:
    """Call fn_a, fn_b, fn_a, fn_b, ... `iters` times each after `warmup` rounds, and return
    what each returned. Alternating makes drift in the machine's speed (other processes,
    clock frequency) hit both equally."""
    for _ in range(warmup):
        fn_a(), fn_b()
    results_a, results_b = [], []
    for _ in range(iters):
        results_a.append(fn_a())
        results_b.append(fn_b())
    return results_a, results_b


def time_pair(fn_a: Callable[[], Any], fn_b: Callable[[], Any], warmup: int, iters: int, *,
              device: torch.device | str = "cpu") -> tuple[float, float]:
    """Median seconds per call of each, measured alternately (see `alternate`). On a CUDA
    `device` the clock is read only after the queued kernels have finished."""
    device = torch.device(device)

    def timed(fn):
        def run() -> float:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            return time.perf_counter() - t0
        return run

    times_a, times_b = alternate(timed(fn_a), timed(fn_b), warmup, iters)
    return statistics.median(times_a), statistics.median(times_b)


def random_llama(*, seed: int = 0, max_seq_len: int = 512) -> Transformer:
    """The benchmark model (`BENCH_LLAMA`) with transformers' random initialisation, as an
    llmstack model in float32 on the CPU. `max_seq_len` sets the context (RoPE needs no
    extra parameters for a longer one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmstack

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**BENCH_LLAMA, max_position_embeddings=max_seq_len))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        return llmstack.from_pretrained(tmp)


def hf_twin(model: Transformer, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
            attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The same weights loaded by transformers (`save_hf`, then `AutoModelForCausalLM`), in eval mode."""
    from transformers import AutoModelForCausalLM

    from llmstack.interop import save_hf

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, f"{tmp}/hf")
        hf = AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", attn_implementation=attn_implementation, dtype=dtype)
    return hf.to(device).eval()


# --------------------------------------------------------------------------- timed generation


@dataclass
class GenerationTiming:
    """One greedy generation: the new tokens and when each step's tokens reached the host."""

    tokens: torch.Tensor  # (B, N) new token ids, on the CPU
    times: list[float]  # N seconds since the call began; times[0] includes the prefill

    @property
    def ttft(self) -> float:
        """Time to first token: prefill plus the first sampled token, in seconds."""
        return self.times[0]

    @property
    def itl(self) -> float:
        """Inter-token latency: median seconds between consecutive tokens of one sequence."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps) if gaps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """New tokens of the whole batch per second of the whole call."""
        return self.tokens.numel() / self.times[-1]


def _check_request(prompts: torch.Tensor, new_tokens: int, max_seq_len: int) -> None:
    if prompts.dim() != 2 or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be a (B, T) tensor with T >= 1, got shape {tuple(prompts.shape)}")
    if not 1 <= new_tokens <= max_seq_len - prompts.shape[1]:
        raise ValueError(f"new_tokens must be between 1 and the context left after the prompt "
                         f"({max_seq_len} - {prompts.shape[1]}), got {new_tokens}")


def time_llmstack_generate(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> GenerationTiming:
    """Greedy `stream_generate` of exactly `new_tokens` per row of `prompts` (B, T), timing each step.
    Each step's tokens are copied to the host, as a server streaming them would."""
    from llmstack.inference.generate import stream_generate

    _check_request(prompts, new_tokens, model.config.max_seq_len)
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    tokens, times = [], []
    _sync(device)
    t0 = time.perf_counter()
    for step in stream_generate(model, prompts, new_tokens, temperature=0):
        tokens.append(step.cpu())  # (B,)
        times.append(time.perf_counter() - t0)
    return GenerationTiming(torch.stack(tokens, dim=1), times)


def time_hf_generate(hf: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> GenerationTiming:
    """Greedy transformers `generate` of exactly `new_tokens` per row, timed by a streamer that
    records when each step's tokens reach the host (transformers copies them there itself)."""
    from transformers.generation.streamers import BaseStreamer

    _check_request(prompts, new_tokens, hf.config.max_position_embeddings)

    class StepTimes(BaseStreamer):
        def __init__(self, t0: float):
            self.t0, self.times, self.seen_prompt = t0, [], False

        def put(self, value: torch.Tensor) -> None:
            if not self.seen_prompt:  # the first call hands over the prompt itself
                self.seen_prompt = True
                return
            self.times.append(time.perf_counter() - self.t0)

        def end(self) -> None:
            pass

    device = hf.device
    prompts = prompts.to(device)
    _sync(device)
    streamer = StepTimes(time.perf_counter())
    with torch.inference_mode():
        # No EOS: both implementations must produce exactly new_tokens. min_new_tokens is not
        # the way, since it bans the EOS token and so changes what greedy picks.
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0, streamer=streamer)
    new = out[:, prompts.shape[1]:].cpu()
    if new.shape[1] != new_tokens or len(streamer.times) != new_tokens:
        raise RuntimeError(f"transformers produced {new.shape[1]} tokens ({len(streamer.times)} streamed steps), "
                           f"expected {new_tokens}")
    return GenerationTiming(new, streamer.times)


def time_compiled_generate(decoder, prompts: torch.Tensor, new_tokens: int) -> GenerationTiming:
    """Greedy decoding of exactly `new_tokens` per row with a `CompiledDecoder`, timed per step
    like `time_llmstack_generate` (each step's tokens copied to the host)."""
    _check_request(prompts, new_tokens, decoder.max_seq_len)
    prompts = prompts.to(decoder.device)
    tokens, times = [], []
    _sync(decoder.device)
    t0 = time.perf_counter()
    logits = decoder.prefill(prompts)
    for i in range(new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        tokens.append(nxt.cpu())
        times.append(time.perf_counter() - t0)
        if i + 1 < new_tokens:
            logits = decoder.step(nxt)
    return GenerationTiming(torch.stack(tokens, dim=1), times)


# --------------------------------------------------------------------------- memory bandwidth


def copy_bandwidth_gbs(device: torch.device | str, nbytes: Optional[int] = None, iters: int = 20) -> float:
    """The device's memory bandwidth as a large copy achieves it: (bytes read + bytes written) per
    second, in GB/s (10^9), the median of `iters` copies. Default size: 1 GiB on a GPU, 256 MiB on
    the CPU (far past any cache)."""
    device = torch.device(device)
    n = nbytes or ((1 << 30) if device.type == "cuda" else (1 << 28))
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 2):  # two untimed copies first: page faults, clocks
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times[2:]) / 1e9


def decode_bytes_per_token(model: Transformer, context: int) -> int:
    """Bytes that one batch-1 decode step must read from memory, at `context` cached tokens:

        every weight once, in the form it is stored (quantized codes and scales included),
        except the embedding tables, of which a lookup reads one row (the token embedding
        counts whole when the output head is tied to it); of each MoE layer's experts only
        top_k / n_experts (the ones a token uses);
      + the keys and values of the cached tokens attended: 2 * layers * kv_heads * head_dim
        * bytes * min(context, sliding_window).

    Achieved bandwidth = this * tokens/s, the figure gpt-fast reports (it counts the weights)."""
    from llmstack.model.moe import MoE

    cfg = model.config
    embed = [*model.embed.parameters(), *model.embed.buffers()]  # float, or a quantized embedding's codes and scales
    lookups = {id(t) for t in embed} if not cfg.tie_embeddings else set()
    if model.pos_embed is not None:
        lookups.add(id(model.pos_embed.weight))
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # each stored tensor once
    total = sum(t.nbytes for key, t in tensors.items() if key not in lookups)
    for module in model.modules():
        if isinstance(module, MoE):
            experts = sum(t.nbytes for t in (*module.experts.parameters(), *module.experts.buffers()))
            total -= experts - experts * module.top_k // module.n_experts
    kv_tokens = min(context, cfg.sliding_window or context)
    kv_bytes = model.norm.weight.element_size()  # the cache takes the model's float dtype
    return total + 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_bytes * kv_tokens


def first_difference(a: torch.Tensor, b: torch.Tensor) -> Optional[tuple[int, int]]:
    """(row, step) of the earliest step where two (B, N) token tensors differ, or None."""
    diff = (a != b).nonzero()  # (n, 2) rows of (row, step)
    if len(diff) == 0:
        return None
    row, step = diff[int(diff[:, 1].argmin())].tolist()
    return row, step

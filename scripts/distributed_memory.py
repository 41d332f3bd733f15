"""Memory per rank of each parallel strategy for model presets, computed from their configs
(`llmstack.distributed.memory`; nothing is built), as tables and a figure, and the diagram of what
each strategy splits.

    python scripts/distributed_memory.py                                   # llama-3.2-1b and llama-3-8b on 8 ranks
    python scripts/distributed_memory.py --presets gpt2-124m --ranks 4 --tokens 4096
    python scripts/distributed_memory.py --png docs/figures/distributed_memory.png \\
        --diagram docs/figures/distributed_strategies.png

`--tokens` is one rank's micro-batch (sequences x length) for the activations; `--recompute` assumes
every block recomputed in backward (train.activation_checkpointing=full).
"""
from llmstack.cli import positive_int, script_parser
from llmstack.distributed.memory import plan_table
from llmstack.model import model_preset

PARTS = ("params", "grads", "optim", "transient", "activations")


def draw_memory(tables: dict, ranks: int, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4), squeeze=False)
    colors = {"params": "#4c72b0", "grads": "#55a868", "optim": "#c44e52", "transient": "#8172b2",
              "activations": "#ccb974"}
    for ax, (name, rows) in zip(axes[0], tables.items()):
        labels = [r["strategy"] if r["ranks"] == 1 else f"{r['strategy']}\n/{ranks}" for r in rows]
        bottom = [0.0] * len(rows)
        for part in PARTS:
            values = [r[part] for r in rows]
            ax.bar(labels, values, bottom=bottom, color=colors[part], label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(f"{name}: memory per rank")
        ax.set_ylabel("GiB")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def draw_strategies(png: str) -> None:
    """Two ranks under each strategy: which pieces of a 4-block model each holds (coloured), per
    state (parameters P, gradients G, optimizer state O), and what they exchange every step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = [
        ("DDP (dp_replicate)", "all-reduce gradients", lambda r, s, b, h: True),
        ("ZeRO-1 (shard_optimizer)", "all-reduce gradients,\nbroadcast updated parameters",
         lambda r, s, b, h: s != "O" or b % 2 == r),
        ("FSDP2 / ZeRO-3 (dp_shard)", "all-gather parameters per block,\nreduce-scatter gradients",
         lambda r, s, b, h: h == r),
        ("Tensor parallel (tp)", "all-reduce (or reduce-scatter +\nall-gather) activations per block",
         lambda r, s, b, h: h == r),
        ("Pipeline parallel (pp)", "send activations forward,\ntheir gradients back",
         lambda r, s, b, h: b // 2 == r),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6))
    rank_colors = ["#4c72b0", "#dd8452"]
    for ax, (title, comm, holds) in zip(axes, panels):
        for r in range(2):
            x0 = r * 1.6
            ax.text(x0 + 0.65, 4.55, f"rank {r}", ha="center", fontsize=9)
            for si, s in enumerate("PGO"):
                ax.text(x0 + 0.05 + si * 0.45 + 0.18, -0.35, s, ha="center", fontsize=8)
                for b in range(4):
                    for h in range(2):  # the two halves of a block: FSDP's shards, TP's heads/columns
                        held = holds(r, s, b, h)
                        ax.add_patch(Rectangle((x0 + 0.05 + si * 0.45 + h * 0.18, 3.3 - b), 0.17, 0.9,
                                               color=rank_colors[r] if held else "#eeeeee", ec="white"))
        ax.text(1.45, -0.95, comm, ha="center", va="top", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-0.1, 3.0)
        ax.set_ylim(-1.9, 4.9)
        ax.axis("off")
    fig.suptitle("What each rank holds of a 4-block model (rows: blocks; P parameters, G gradients, "
                 "O optimizer state; each cell a half of a block)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    parser = script_parser(__doc__, threads=False)
    parser.add_argument("--presets", nargs="+", default=["llama-3.2-1b", "llama-3-8b"])
    parser.add_argument("--ranks", type=positive_int, default=8)
    parser.add_argument("--tokens", type=positive_int, default=8192, help="tokens of one rank's micro-batch")
    parser.add_argument("--recompute", action="store_true", help="every block recomputed in backward")
    parser.add_argument("--png", help="draw the memory per rank here")
    parser.add_argument("--diagram", help="draw what each strategy splits here")
    args = parser.parse_args()
    tables = {}
    for name in args.presets:
        rows = plan_table(model_preset(name), args.ranks, tokens=args.tokens, recompute=args.recompute)
        tables[name] = rows
        print(f"\n{name}, {args.ranks} ranks, {args.tokens} tokens per rank per micro-batch"
              f"{', every block recomputed' if args.recompute else ''} (GiB per rank)\n")
        print("| strategy | ranks | parameters | gradients | optimizer | gathered (FSDP) | activations | total |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['strategy']} | {r['ranks']} | " + " | ".join(f"{r[k]:.1f}" for k in PARTS) +
                  f" | {r['total']:.1f} |")
    if args.png:
        draw_memory(tables, args.ranks, args.png)
    if args.diagram:
        draw_strategies(args.diagram)


if __name__ == "__main__":
    main()

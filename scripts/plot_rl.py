"""Reward, KL to the reference and held-out success over the steps of GRPO/PPO runs, one line per run.

    python scripts/plot_rl.py runs/quickstart-grpo-seed1 runs/quickstart-grpo-seed2 --out grpo.png

Read from each run's metrics.jsonl (a run also draws its own rl.png when it ends).
"""
import sys
from pathlib import Path

from llmstack.cli import script_parser
from llmstack.finetune.rl import plot_rl


def main() -> None:
    parser = script_parser(__doc__, threads=False)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            sys.exit(f"error: {run} has no metrics.jsonl")
    if plot_rl(args.runs, args.out) is not None:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

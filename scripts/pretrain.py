"""Pretrain a model from a YAML config.

    python scripts/pretrain.py --config configs/pretrain/quickstart.yaml
    python scripts/pretrain.py --config configs/pretrain/quickstart.yaml train.max_steps=50 train.out_dir=runs/short
    python scripts/pretrain.py --config configs/pretrain/quickstart.yaml --resume
"""
import math
import sys

from llmstack.cli import parse_cli
from llmstack.config import ConfigError
from llmstack.train import PretrainConfig
from llmstack.data import DataError
from llmstack.train import TrainingError, pretrain


def main() -> None:
    cfg, args = parse_cli(PretrainConfig, description=__doc__, extra_args=lambda p: p.add_argument(
        "--resume", action="store_true", help="continue the run in train.out_dir"))
    try:
        result = pretrain(cfg, resume=args.resume)
    except (ConfigError, DataError, TrainingError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    val = result.val
    # A run resumed at its last step trains nothing, so it has no train loss of its own.
    train = f", train loss {result.train_loss:.3f}" if math.isfinite(result.train_loss) else ", already complete"
    print(f"done: step {result.step}{train}"
          + (f", val loss {val['loss']:.3f}, perplexity {val['perplexity']:.1f}" if val else "")
          + (f", {val['bits_per_byte']:.3f} bits/byte" if val.get("bits_per_byte") else "")
          + f"\ncheckpoint: {result.checkpoint}")


if __name__ == "__main__":
    main()

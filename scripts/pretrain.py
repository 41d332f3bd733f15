"""Pretrain a model from a YAML config.

    python scripts/pretrain.py --config configs/pretrain/quickstart.yaml
    python scripts/pretrain.py --config configs/pretrain/quickstart.yaml train.max_steps=50 train.out_dir=runs/short
    python scripts/pretrain.py --config configs/pretrain/quickstart.yaml --resume
    python scripts/pretrain.py --config configs/pretrain/quickstart.yaml --threads 2   # or LLMSTACK_THREADS=2

Ctrl-C finishes the current step, saves a checkpoint and stops; --resume continues
exactly where it stopped. A bad config or flag is one line on stderr, exit code 2,
before anything is written.
"""
import math
import sys

from llmstack.cli import fail, is_rank_zero, parse_cli
from llmstack.config import ConfigError
from llmstack.data import DataError
from llmstack.runtime import set_threads
from llmstack.train import PretrainConfig, TrainingError, pretrain


def main() -> None:
    cfg, args = parse_cli(PretrainConfig, description=__doc__, extra_args=lambda p: p.add_argument(
        "--resume", action="store_true", help="continue the run in train.out_dir"))
    try:
        set_threads(args.threads)
        result = pretrain(cfg, resume=args.resume)
    except ConfigError as e:
        fail(f"config error: {e}")
    except (DataError, ValueError, FileNotFoundError) as e:  # the corpus, a tokenizer or checkpoint file
        fail(f"error: {e}")
    except (TrainingError, OSError) as e:  # the run diverged; a disk full or unwritable
        fail(f"error: {e}", code=1)
    except KeyboardInterrupt:
        sys.exit(130)
    if not is_rank_zero():  # under torchrun, rank 0 reports
        return
    val = result.val
    # A run resumed at its last step trains nothing, so it has no train loss of its own.
    train = f", train loss {result.train_loss:.3f}" if math.isfinite(result.train_loss) else ", already complete"
    print(f"done: step {result.step}{train}"
          + (f", val loss {val['loss']:.3f}, perplexity {val['perplexity']:.1f}" if val else "")
          + (f", {val['bits_per_byte']:.3f} bits/byte" if val.get("bits_per_byte") else "")
          + f"\ncheckpoint: {result.checkpoint}")


if __name__ == "__main__":
    main()

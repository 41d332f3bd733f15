"""Fine-tune a model on conversations from a YAML config: full, LoRA or QLoRA.

    python scripts/finetune.py --config configs/finetune/quickstart-lora.yaml
    python scripts/finetune.py --config configs/finetune/quickstart-lora.yaml lora.rank=16 train.max_steps=50
    python scripts/finetune.py --config configs/finetune/smollm2-qlora.yaml --threads 2
    python scripts/finetune.py --config configs/finetune/quickstart-lora.yaml --resume

The job names a base (an llmstack run or checkpoint, a Hugging Face directory, a GGUF file),
a method (full, lora, qlora) and conversations (JSONL, or the standard-library instructions),
and trains with the pretraining loop: same schedules, accumulation, precision, checkpoints,
metrics and plots. LoRA and QLoRA checkpoints hold the adapter alone, in PEFT's format.
Ctrl-C saves and stops; --resume continues exactly. A bad config is one line on stderr, exit 2,
before anything is written.
"""
import math
import sys

from llmstack.cli import fail, is_rank_zero, parse_cli
from llmstack.config import ConfigError
from llmstack.data import DataError
from llmstack.finetune.config import FinetuneConfig
from llmstack.finetune.job import finetune
from llmstack.runtime import set_threads
from llmstack.train import TrainingError


def main() -> None:
    cfg, args = parse_cli(FinetuneConfig, description=__doc__, extra_args=lambda p: p.add_argument(
        "--resume", action="store_true", help="continue the run in train.out_dir"))
    try:
        set_threads(args.threads)
        result = finetune(cfg, resume=args.resume)
    except ConfigError as e:
        fail(f"config error: {e}")
    except (DataError, ValueError, FileNotFoundError) as e:  # the conversations, the base, an adapter
        fail(f"error: {e}")
    except (TrainingError, OSError) as e:
        fail(f"error: {e}", code=1)
    except KeyboardInterrupt:
        sys.exit(130)
    if not is_rank_zero():  # under torchrun, rank 0 reports
        return
    train = f", train loss {result.train_loss:.3f}" if math.isfinite(result.train_loss) else ", already complete"
    first = result.first_val or {}
    shown = [f"{k} {v:.4g}" + (f" (before: {first[k]:.4g})" if k in first else "") for k, v in (result.val or {}).items()
             if isinstance(v, float) and k != "perplexity"]
    print(f"done: step {result.step}{train}" + (f"; held out: {', '.join(shown)}" if shown else "")
          + f"\ncheckpoint: {result.checkpoint}")


if __name__ == "__main__":
    main()

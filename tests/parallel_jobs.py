"""Several pretraining jobs in one torchrun launch, one after the other in the same process group
(starting the processes costs more than these tiny jobs): what tests/test_parallel.py runs.

    torchrun --standalone --nproc_per_node 2 tests/parallel_jobs.py CONFIG "OUT_DIR key=value ..." ...

Each argument after the config is a job: its out_dir and dotted overrides; `--resume` continues it,
`--finetune=CONFIG` makes it a fine-tuning job with that config.
"""
import shlex
import sys

import torch

from llmstack.config import load_config
from llmstack.finetune import FinetuneConfig, finetune
from llmstack.train import PretrainConfig, pretrain


def main() -> None:
    torch.set_num_threads(1)
    config, *jobs = sys.argv[1:]
    for job in jobs:
        out, *overrides = shlex.split(job)
        flags = [o for o in overrides if o.startswith("--")]
        overrides = [f"train.out_dir={out}", *(o for o in overrides if not o.startswith("--"))]
        tune = next((f.split("=", 1)[1] for f in flags if f.startswith("--finetune=")), None)
        if tune:
            finetune(load_config(FinetuneConfig, tune, overrides), resume="--resume" in flags, progress=False)
        else:
            pretrain(load_config(PretrainConfig, config, overrides), resume="--resume" in flags, progress=False)


if __name__ == "__main__":
    main()

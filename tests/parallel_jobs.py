"""Several pretraining jobs in one torchrun launch, one after the other in the same process group
(starting the processes costs more than these tiny jobs): what tests/test_parallel.py runs.

    torchrun --standalone --nproc_per_node 2 tests/parallel_jobs.py CONFIG "OUT_DIR key=value ..." ...

Each argument after the config is a job: its out_dir and dotted overrides; `--resume` continues it.
"""
import shlex
import sys

import torch

from llmstack.config import load_config
from llmstack.train import PretrainConfig, pretrain


def main() -> None:
    torch.set_num_threads(1)
    config, *jobs = sys.argv[1:]
    for job in jobs:
        out, *overrides = shlex.split(job)
        resume = "--resume" in overrides
        cfg = load_config(PretrainConfig, config, [f"train.out_dir={out}", *(o for o in overrides if o != "--resume")])
        pretrain(cfg, resume=resume, progress=False)


if __name__ == "__main__":
    main()

"""Metrics: one JSON line per log step, TensorBoard when installed, a loss-curve PNG at the end."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from llmstack.io import atomic_write_text


class MetricsLogger:
    """`resume_step`: the step a run continues from. Rows after it (written before a crash, and
    about to be written again) are dropped, as is a torn last line; a fresh run (None) starts an
    empty file. metrics.jsonl then reads as if the run had never stopped."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in _lines(self.path) if _step_of(line) <= resume_step] if resume_step is not None else []
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one line
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: the JSONL is the record
                self.tb = None

    def log(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _step_of(line: str) -> float:
    """A row's step; a torn line (a crash mid-write) counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def plot_metrics(jsonl: str | Path, png: str | Path) -> Optional[Path]:
    """Train and validation loss against step, from metrics.jsonl. Needs matplotlib: without it,
    a one-line warning and no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib is not installed, so {png} was not drawn (pip install matplotlib)",
              file=sys.stderr)
        return None
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and not r.get("bad_step")]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)

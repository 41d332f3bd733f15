"""What every script's command line shares: one spelling for the flags that recur (`--checkpoint`,
`--device`, `--dtype fp32|fp16|bf16`, `--threads`, `--max-new-tokens`, `--batch-size`, lists as
space-separated values), `--config FILE` with dotted overrides for job scripts, and errors as one
line (exit code 2) instead of a traceback."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional

from llmstack.config import ConfigError, dump_config, load_config


def is_rank_zero() -> bool:
    """Whether this process prints errors: under torchrun every rank fails alike and rank 0 says why."""
    return os.environ.get("RANK", "0") == "0"


def fail(message: str, code: int = 2) -> None:
    """Exit with one line on stderr (from rank 0 only under torchrun)."""
    if is_rank_zero():
        print(message, file=sys.stderr)
    sys.exit(code)


class OneLineErrors(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`error: ...`, exit code 2), without the usage text."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists the options)\n")

    def exit(self, status: int = 0, message: Optional[str] = None):
        super().exit(status, message if is_rank_zero() else None)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = _int_at_least(1)  # an argparse `type`
non_negative_int = _int_at_least(0)

# The dtypes a script may be asked for, as `train.precision` spells them (torch.float32, ... in
# llmstack.runtime.DTYPES).
DTYPE_NAMES = ("fp32", "fp16", "bf16")


def script_parser(description: Optional[str], *, threads: bool = True) -> OneLineErrors:
    """The parser every script starts from: its docstring as the help, one-line errors, and
    `--threads` where it runs torch."""
    parser = OneLineErrors(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if threads:
        add_threads_argument(parser)
    return parser


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads N`, for `llmstack.runtime.set_threads(args.threads)`."""
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads for torch (default: $LLMSTACK_THREADS, else one fewer than the cores)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device`, for `llmstack.runtime.resolve_device(args.device)`."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N "
                                                         "(default auto)")


def add_dtype_argument(parser: argparse.ArgumentParser, *, auto: str = "bf16 on CUDA, else fp32") -> None:
    """`--dtype auto|fp32|fp16|bf16`, for `llmstack.runtime.resolve_dtype(args.dtype, device)`;
    `auto` describes what the script picks when it is not given."""
    parser.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                        help=f"weights and activations (default auto: {auto})")


def parse_cli(cls: type, argv: Optional[list[str]] = None, *, description: str = "",
              extra_args: Optional[Callable[[argparse.ArgumentParser], Any]] = None) -> tuple[Any, argparse.Namespace]:
    """Parse `--config FILE`, dotted overrides (`model.n_layers=4 train.lr=3e-4`),
    `--print-config` and `--threads N` into a validated `cls`.

    `extra_args(parser)` may add script-specific flags. Returns (config, parsed args); the
    script passes `args.threads` to `llmstack.runtime.set_threads`. Config and flag errors end
    the program with one line naming the key, not a traceback, and nothing done yet.
    """
    parser = OneLineErrors(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_threads_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides")
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        parser.exit(0)
    return cfg, args


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Exit with one error line when a command-line flag is below 1 (`args.max_new_tokens` is
    `--max-new-tokens`; None means not given)."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and v < 1:
                raise SystemExit(f"error: --{name.replace('_', '-')} must be an integer >= 1, got {v}")

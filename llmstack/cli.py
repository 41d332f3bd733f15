"""What every script's command line shares: `--config FILE`, dotted overrides, `--print-config`,
and errors as one line (exit code 2) instead of a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional

from llmstack.config import ConfigError, dump_config, load_config


def parse_cli(cls: type, argv: Optional[list[str]] = None, *, description: str = "",
              extra_args: Optional[Callable[[argparse.ArgumentParser], Any]] = None) -> tuple[Any, argparse.Namespace]:
    """Parse `--config FILE`, dotted overrides (`model.n_layers=4 train.lr=3e-4`) and
    `--print-config` into a validated `cls`.

    `extra_args(parser)` may add script-specific flags. Returns (config, parsed args).
    Config errors end the program with one line naming the key, not a traceback.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
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

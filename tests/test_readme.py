"""The README stays true: its config reference lists every key with its current default."""
import dataclasses
import re
import typing
from pathlib import Path

from llmstack.data import DataConfig
from llmstack.model import MoEConfig, ModelConfig, RopeScaling
from llmstack.tokenizer import TokenizerConfig
from llmstack.train import TrainConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def config_keys(cls, prefix):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        yield key, f
        for sub in (RopeScaling, MoEConfig):
            if sub in typing.get_args(hints[f.name]):
                yield from config_keys(sub, key)


def test_config_reference_lists_every_key_with_its_default():
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `([\w.]+)` \| [^|]+ \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    sections = {"model": ModelConfig, "tokenizer": TokenizerConfig, "data": DataConfig, "train": TrainConfig}
    for prefix, cls in sections.items():
        for key, f in config_keys(cls, prefix):
            assert key in rows, f"README's config reference lacks {key}"
            if f.default is not dataclasses.MISSING:
                shown = rows[key].strip("`")
                expected = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) \
                    else str(f.default)
                assert shown == expected, f"README says {key} defaults to {shown}, the code says {expected}"

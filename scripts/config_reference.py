"""Write docs/configs.md, the reference of every config key, from the config schemas themselves.

    python scripts/config_reference.py            # rewrite docs/configs.md
    python scripts/config_reference.py --check    # exit 1 when the page differs from the schemas

Each key's type and default come from its dataclass field, its meaning from the field's
`option(default, "meaning")`; tests/test_docs.py fails when the page is out of date.
"""
import sys
from pathlib import Path

from llmstack.cli import script_parser
from llmstack.config import reference_rows
from llmstack.model import list_presets
from llmstack.finetune.config import FinetuneConfig
from llmstack.train import PretrainConfig

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configs.md"

# (title, the command that reads it, schema): one table per job.
JOBS = [
    ("Pretraining", "scripts/pretrain.py", PretrainConfig),
    ("Fine-tuning", "scripts/finetune.py", FinetuneConfig),
]

INTRO = """# Configs

A job is a YAML file under `configs/` mirroring a typed config (a dataclass per section).
Every job script takes `--config FILE`, dotted overrides and `--print-config`:

    python scripts/pretrain.py --config configs/pretrain/quickstart.yaml model.n_layers=2 train.lr=1e-3 --print-config

Overrides are parsed as YAML (`train.lr=3e-4`, `model.moe=null`, `model.rope_scaling.factor=4`).
A run saves its fully resolved config next to its checkpoint, so a checkpoint directory alone
rebuilds the model and resumes the run.

`model:` may name a preset from `configs/model/` ({presets}), or be a mapping with an
optional `preset:` base whose fields it overrides. An unknown key is an error naming the key
and the nearest valid ones; a wrong type names the key and the expected type; values out of
range and inconsistent shapes are errors before any data is prepared or any tensor is built:

    $ python scripts/pretrain.py --config configs/pretrain/quickstart.yaml model.n_layres=2
    config error: unknown config key 'model.n_layres'; did you mean 'model.n_layers' or 'model.n_heads' or 'model.norm_eps'? (...)

This page is generated from the schemas by `python scripts/config_reference.py`.
"""


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = [INTRO.format(presets=", ".join(f"`{p}`" for p in list_presets())).rstrip(), ""]
    for title, command, schema in JOBS:
        lines += [f"## {title} (`{command}`, `{schema.__name__}`)", ""]
        header = ["| key | type and default | meaning |", "| --- | --- | --- |"]
        in_table = False
        for key, type_name, default, meaning in reference_rows(schema, ""):
            key = key.lstrip(".")
            if default == "(section)":  # a section of the job: a heading, then its keys
                lines += ["", f"### `{key}`: {meaning}", "", *header]
                in_table = True
                continue
            if not in_table:  # keys of the job itself, before its sections
                lines += header
                in_table = True
            lines.append(f"| `{key}` | {cell(type_name)}; default `{default}` | {cell(meaning)} |")
        lines.append("")
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def main() -> None:
    parser = script_parser(__doc__, threads=False)
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            sys.exit(f"{PAGE} is out of date: run python scripts/config_reference.py")
        print(f"{PAGE} is up to date")
        return
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()

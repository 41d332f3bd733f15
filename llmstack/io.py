"""Writing files so that a crash at any moment leaves either the old version or the new one.

    atomic_directory(path, write)   write(tmp) fills a fresh sibling folder, which then replaces path
    atomic_write_text(path, text)   the same for one small file

Temporary folders and files carry the name of their target (`.NAME.tmp-*`), so
`remove_stale_temporaries` can clear what a killed process left behind.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

# What a checkpoint directory holds (ours, Hugging Face's weights, a PEFT adapter, the trainer's state). Swapping a new
# checkpoint in replaces the old directory whole, so one holding anything else is refused.
CHECKPOINT_FILE = re.compile(r"(generation_)?config\.(yaml|json)|tokenizer(_config)?\.json|trainer_state\.pt"
                             r"|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
                             r"|adapter_config\.json|adapter_model\.safetensors|dcp")
# What atomic_directory and atomic_write_text name their temporaries: `.NAME.tmp-*` and `.NAME.old-*`.
TEMPORARY = re.compile(r"\.(.+)\.(?:tmp|old)-[^.]*")


def atomic_directory(directory: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a fresh sibling directory, then swap it in for `directory`.

    An existing `directory` is replaced only when it holds nothing but checkpoint files
    (`CHECKPOINT_FILE`): anything else in it would be lost, so that is a FileExistsError."""
    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory; save the checkpoint elsewhere")
        others = sorted(p.name for p in directory.iterdir() if not CHECKPOINT_FILE.fullmatch(p.name))
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise FileExistsError(f"{directory} holds files that are not part of a checkpoint ({shown}); saving "
                                  f"replaces the directory whole: choose a new or empty one, or remove it first")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)  # two renames: the window without `directory` is tiny
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_stale_temporaries(folder: str | os.PathLike, names: Optional[Iterable[str]] = None) -> list[Path]:
    """Delete the temporaries that killed writers left in `folder` (`.NAME.tmp-*`, `.NAME.old-*`), for
    every NAME or only those in `names`; returns what was removed. Only for a folder that one process
    writes at a time (a training run's), since another writer's temporaries are in use."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if names is None else set(names)
    removed = []
    for p in folder.iterdir():
        m = TEMPORARY.fullmatch(p.name)
        if m is None or (wanted is not None and m.group(1) not in wanted):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed

"""`load(path)`: whichever tokenizer a file or folder holds.

    tok = load("runs/quickstart/checkpoints/step_000300/tokenizer.json")   # llmstack's own: Tokenizer
    tok = load("Llama-3.2-1B-Instruct")                                      # Hugging Face: HFTokenizer
    tok = load("SmolLM2-135M-Instruct.Q4_1.gguf")                            # GGUF metadata: HFTokenizer

Both classes have one interface: encode/encode_batch/decode, vocab_size, bos_id, eos_id,
pad_id, stop_ids, special_tokens, chat_template, apply_chat_template, encode_chat, fingerprint, save.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llmstack.tokenizer.tokenizer import Tokenizer

NOT_A_TOKENIZER = ("is not a tokenizer llmstack can read: neither llmstack's tokenizer.json, a Hugging Face "
                   "tokenizer.json nor a GGUF file")
# The first keys of each kind's JSON, to tell a truncated file of a known kind from any other file.
_OURS = re.compile(r'\s*\{\s*"type"\s*:\s*"(bpe|tiktoken)"')
_HF = re.compile(r'\s*\{\s*"(version|truncation|padding|added_tokens|normalizer|pre_tokenizer|model)"\s*:')


def load(path: str | os.PathLike):
    """The tokenizer at `path`: llmstack's tokenizer.json (a `Tokenizer`), a Hugging Face tokenizer.json
    with the tokenizer_config.json, generation_config.json and config.json beside it, a folder holding
    either (a tokenizer.json, else a single .gguf file), or a GGUF file (an `HFTokenizer`).
    Anything else is a ValueError saying so; a truncated JSON file of a known kind says it is corrupt."""
    from llmstack.tokenizer.gguf import is_gguf, load_gguf

    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        else:
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise FileNotFoundError(f"{path} holds no tokenizer.json" + (
                    f" and {len(ggufs)} GGUF files: give the one to read" if ggufs else " nor a GGUF file"))
            path = ggufs[0]
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} not found")
    if is_gguf(path):
        return load_gguf(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} {NOT_A_TOKENIZER}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        head = text[:4096]
        if _OURS.match(head) or _HF.match(head):
            raise ValueError(f"tokenizer file {str(path)!r} is corrupt or truncated ({e})") from None
        raise ValueError(f"{path} {NOT_A_TOKENIZER}") from None
    if isinstance(spec, dict) and spec.get("type") in ("bpe", "tiktoken"):
        return Tokenizer.load(path)
    if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
        from llmstack.tokenizer.hf import HFTokenizer

        return HFTokenizer.from_file(path, text)
    raise ValueError(f"{path} {NOT_A_TOKENIZER}")

"""The tokenizer of a GGUF file (llama.cpp's model format), rebuilt from its metadata.

    tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")     # an HFTokenizer

A GGUF holds no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`,
with a type per token and, for SentencePiece, a score), the merges, the special token ids
and flags, and the chat template as metadata, and names the tokenizer's kind in
`tokenizer.ggml.model`. We rebuild a `tokenizers.Tokenizer` from them as transformers does
(integrations/gguf/gguf_tokenizer_mapping.py), following llama.cpp (src/llama-vocab.cpp)
where the two disagree:

- "gpt2": byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM, ...). The text is split by the
  regular expressions that `tokenizer.ggml.pre` names (`PRE_TOKENIZERS`), then BPE runs on
  the bytes of each piece spelled in GPT-2's byte alphabet. Two llama.cpp rules that
  transformers' GGUF loader lacks, both from the tokenizer.json these files were made from:
  Llama 3's and Tekken's take a piece that is in the vocabulary whole before merging
  (`ignore_merges`), and SmolLM's and StarCoder's split every digit off first (which changes
  digits other than 0-9, such as "١" or "½").
- "llama": SentencePiece-style BPE with byte fallback (Llama 2, Mistral, ...). Spaces become
  `▁`, and one is put in front of the text (`tokenizer.ggml.add_space_prefix`, default true)
  as transformers does: not when the text starts with a space, nor after a special token
  (llama.cpp adds one in both cases). Characters outside the vocabulary become their UTF-8
  byte tokens `<0xXX>`. Files of this kind often have no merges: they are recovered from the
  token scores (every split of a token into two tokens is a merge ranked by the token's
  score, the order transformers' `generate_merges` gives).

Tokens typed control (3) are added whole as special tokens, user-defined ones (4) as plain
added tokens, so their spellings in text encode as their ids. BOS is put in front of a
prompt (`add_bos_token`) as the file says, or by llama.cpp's default when it does not: yes
for "llama" files and Llama 3's pre-tokenizer, no otherwise.

`read_metadata` reads the key-value section only, and no tensor: the gguf package's
`GGUFReader` makes numpy views of every string of a file first, which takes 4 s for
SmolLM2's 49k tokens and 49k merges (and grows with the vocabulary), where this takes 0.08 s.
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from llmstack.tokenizer.hf import HFTokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # in ByteLevel(use_regex=True)
DIGITS = r"\p{N}"  # each digit alone: tokenizers' Digits(individual_digits=True)
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (the regular expressions that split the text, one after the other, as in
# llama.cpp's llm_tokenizer_bpe; whether a piece found whole in the vocabulary skips the merges;
# whether BOS is added when the file does not say)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {}
for _names, _spec in [
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     ((LLAMA3,), True, True)),
    (("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), ((LLAMA3,), False, False)),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "megrez", "hunyuan"), ((QWEN2,), False, False)),
    (("qwen35",), ((QWEN35,), False, False)),
    (("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"),
     ((GPT2,), False, False)),
    # StarCoder's and SmolLM's tokenizer.json split every digit off first (transformers' GGUF loader does not)
    (("starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     ((DIGITS, GPT2), False, False)),
    (("gpt-4o", "llama4", "kanana2"), ((GPT4O,), False, False)),
    (("tekken",), ((TEKKEN,), True, True)),
]:
    PRE_TOKENIZERS.update(dict.fromkeys(_names, _spec))


def load_gguf(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer, special tokens, BOS flag and chat template of a GGUF file."""
    path = Path(path)
    meta = read_metadata(path, wanted=lambda key: key.startswith("tokenizer."))
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path} holds no tokenizer (its metadata has no tokenizer.ggml.model and tokens)")
    if kind == "gpt2":
        backend, add_bos_default = _byte_level(meta, path)
    elif kind == "llama":
        backend, add_bos_default = _sentencepiece(meta, path)
    else:
        raise ValueError(f"{path} has a tokenizer of kind tokenizer.ggml.model = {kind!r}, which llmstack cannot "
                         "read: it reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE with byte fallback)")
    tokens = meta["tokenizer.ggml.tokens"]

    def named(key: str) -> Optional[str]:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default)
    bos = named("bos")
    if add_bos and bos is not None:  # so that tokenizer.json alone, once saved, adds it too
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    stops = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eot", "eom") if f"tokenizer.ggml.{k}_token_id" in meta]
    return HFTokenizer(backend, bos_token=bos, eos_token=named("eos"), pad_token=named("padding"),
                       unk_token=named("unknown"), add_bos_token=add_bos,
                       chat_template=meta.get("tokenizer.chat_template"), extra_stop_ids=stops)


def _byte_level(meta: dict, path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre")
    if pre is None:
        warnings.warn(f"{path} does not name its pre-tokenizer (tokenizer.ggml.pre, missing from old files): "
                      "splitting the text as GPT-2 does, which may not be how this model was trained", stacklevel=3)
        pre = "gpt-2"
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path} splits text with the pre-tokenizer tokenizer.ggml.pre = {pre!r}, which llmstack "
                         f"does not know; known: {', '.join(sorted(PRE_TOKENIZERS))}")
    regexes, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{path} has a byte-level BPE tokenizer without merges (tokenizer.ggml.merges)")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spelling = byte_spelling()
    tokens, types = meta["tokenizer.ggml.tokens"], _types(meta)
    # Every token of a byte-level vocabulary is spelled in the byte alphabet; the few that are not (added
    # tokens written out plainly) are respelled so the merges that build them still find them.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_merges(meta["tokenizer.ggml.merges"]), dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                   ignore_merges=ignore_merges))
    # The pipeline of the tokenizer.json these files were converted from: GPT-2's regex is ByteLevel's own.
    splits = [pre_tokenizers.Digits(individual_digits=True) if r == DIGITS else
              pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes if r != GPT2]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=GPT2 in regexes)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a mislabelled one (transformers skips it too).
    _add_typed_tokens(backend, tokens, types, control_ok=lambda t: set(t) <= alphabet)
    return backend, add_bos


def _sentencepiece(meta: dict, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, types = meta["tokenizer.ggml.tokens"], _types(meta)
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _merges(meta["tokenizer.ggml.merges"])
    elif "tokenizer.ggml.scores" in meta:
        merges = merges_from_scores(tokens, meta["tokenizer.ggml.scores"])
    else:
        raise ValueError(f"{path} has a SentencePiece tokenizer with neither merges nor scores")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
                                   unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                     prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_typed_tokens(backend, tokens, types, control_ok=lambda t: True)
    return backend, True


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece merges recovered from the vocabulary: each way to cut a token into two tokens is a
    merge, ranked by the token's score (higher first; ties: longer left part, then longer right part,
    then the order of the vocabulary). transformers' `generate_merges`, which its GGUF loader uses."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        found.extend((left, right, score) for left, right in local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _merges(merges: list[str]) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        cut = m.find(" ", 1)  # as llama.cpp: the first space after the first character
        out.append((m[:cut], m[cut + 1:]))
    return out


def _types(meta: dict) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    return list(types) if types is not None else [NORMAL] * len(meta["tokenizer.ggml.tokens"])


def _add_typed_tokens(backend, tokens: list[str], types: list[int], control_ok: Callable[[str], bool]) -> None:
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == CONTROL and control_ok(t)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def byte_spelling() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the others for chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    for k, b in enumerate(b for b in range(256) if b not in spelling):
        spelling[b] = chr(256 + k)
    return spelling


# ---------------------------------------------------------------------- the metadata

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_metadata(path: str | os.PathLike, wanted: Callable[[str], bool] = lambda key: True) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (versions 2 and 3, either byte order) whose keys `wanted`
    accepts: numbers, bools and strings as Python values, arrays as lists. Tensors are not read."""
    import numpy as np

    path = Path(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24 or f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            version = struct.unpack_from("<I", buf, 4)[0]
            order = "<"
            if version & 0xFFFF == 0:  # written big-endian
                order, version = ">", struct.unpack_from(">I", buf, 4)[0]
            if version not in (2, 3):
                raise ValueError(f"{path} is GGUF version {version}; llmstack reads versions 2 and 3")
            u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

            def string(off: int, decode: bool = True) -> tuple[Optional[str], int]:
                n = u64.unpack_from(buf, off)[0]
                end = off + 8 + n
                if end > len(buf):
                    raise IndexError
                return (buf[off + 8:end].decode("utf-8", errors="replace") if decode else None), end

            def value(kind: int, off: int, decode: bool) -> tuple[Any, int]:
                if kind == _STRING:
                    return string(off, decode)
                if kind == _ARRAY:
                    item, n = u32.unpack_from(buf, off)[0], u64.unpack_from(buf, off + 4)[0]
                    off += 12
                    if item in _SCALAR:  # numbers in one read
                        size = struct.calcsize(_SCALAR[item])
                        end = off + n * size
                        if end > len(buf):
                            raise IndexError
                        values = (np.frombuffer(buf, np.dtype(order + _SCALAR[item]), n, off).tolist()
                                  if decode else None)
                        return values, end
                    values = []
                    for _ in range(n):
                        v, off = value(item, off, decode)
                        values.append(v)
                    return (values if decode else None), off
                if kind in _SCALAR:
                    s = struct.Struct(order + _SCALAR[kind])
                    return s.unpack_from(buf, off)[0], off + s.size
                raise ValueError(f"unknown GGUF value type {kind}")

            meta: dict[str, Any] = {}
            try:
                n_kv = u64.unpack_from(buf, 16)[0]
                off = 24
                for _ in range(n_kv):
                    key, off = string(off)
                    kind = u32.unpack_from(buf, off)[0]
                    keep = wanted(key)
                    v, off = value(kind, off + 4, keep)
                    if keep:
                        meta[key] = v
            except (struct.error, IndexError, ValueError) as e:
                raise ValueError(f"{path} is a truncated or corrupt GGUF file ({e or type(e).__name__})") from None
            return meta

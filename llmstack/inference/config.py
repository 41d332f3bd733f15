"""How to decode, as one object: `GenerationConfig`, the options of `scripts/generate.py`.

Three ways to produce text share one prompt and one token budget: sampling (greedy
at temperature 0), beam search, and speculative decoding (with a draft model or by
prompt lookup). Not every option applies to every way; `validate()` holds the rules,
so a notebook gets the same errors as the command line:

    cfg = GenerationConfig(num_beams=4, temperature=0.7).validate()
    ValueError: num_beams runs beam search, which does not sample: temperature cannot be used with it

`None` means "not given": each way fills in its own default (`sampling()`, `beam()`,
`speculative()` return the keyword arguments of `generate`, `beam_search` and
`speculative_generate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

from llmstack.config import option

# What sampling uses when an option is not given (the command line's defaults).
SAMPLING_DEFAULTS = dict(temperature=0.8, top_k=None, top_p=0.95, min_p=None, repetition_penalty=1.0,
                         frequency_penalty=0.0, presence_penalty=0.0, seed=None)
# What speculative decoding keeps exact (it samples the target's own distribution); min-p and
# the penalties would change that distribution as tokens are accepted in bulk.
SPECULATIVE_SAMPLING = ("temperature", "top_k", "top_p", "seed")
BEAM_ONLY = ("num_return_sequences", "length_penalty", "early_stopping")
EARLY_STOPPING = {"true": True, "false": False, "never": "never"}


def _plain(name: str) -> str:
    return name


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


@dataclass
class GenerationConfig:
    max_new_tokens: int = option(200, "tokens to generate at most (capped by the model's context)")
    temperature: Optional[float] = option(None, "0 = greedy (default 0.8)")
    top_k: Optional[int] = option(None, "keep the k most likely tokens (default: off)")
    top_p: Optional[float] = option(None, "nucleus sampling (default 0.95)")
    min_p: Optional[float] = option(None, "keep tokens with p >= min_p * p_max (default: off)")
    repetition_penalty: Optional[float] = option(None, "> 1 discourages repeats (default 1 = off)")
    frequency_penalty: Optional[float] = option(None, "minus this per earlier occurrence (default 0)")
    presence_penalty: Optional[float] = option(None, "minus this once a token occurred (default 0)")
    seed: Optional[int] = option(None, "for reproducible sampling (default: random)")
    stop: list[str] = option(doc="stop before any of these texts", factory=list)
    num_beams: Optional[int] = option(None, "beam search with this width (no sampling)")
    num_return_sequences: Optional[int] = option(None, "beam search: how many of the best hypotheses (default: all)")
    length_penalty: Optional[float] = option(None, "beam search: score = log-prob / new_tokens ** this (default 1)")
    early_stopping: Optional[Literal["true", "false", "never"]] = option(
        None, "beam search: true = stop once num_beams hypotheses finished; false = once no running beam can "
              "win (default); never = search the whole width")
    draft: Optional[str] = option(None, "speculative decoding with this smaller model (a checkpoint, same tokenizer)")
    prompt_lookup: bool = option(False, "speculative decoding that drafts by matching n-grams of the text so far")
    k: Optional[int] = option(None, "speculative decoding: tokens proposed per target pass (default 4)")
    ngram: Optional[int] = option(None, "prompt lookup: longest n-gram matched (default 3)")

    @property
    def mode(self) -> Literal["sample", "beam", "speculative"]:
        if self.num_beams is not None:
            return "beam"
        return "speculative" if self.draft is not None or self.prompt_lookup else "sample"

    def validate(self, name: Callable[[str], str] = _plain) -> "GenerationConfig":
        """Raise ValueError when options that do not go together are given together. `name`
        spells an option in the message (a script passes `lambda n: "--" + n.replace("_", "-")`).
        Each value's range is checked by the function that uses it."""
        sampling = [n for n in SAMPLING_DEFAULTS if getattr(self, n) is not None]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"{name('stop')} takes non-empty texts, got {self.stop!r}")
        if self.draft is not None and self.prompt_lookup:
            raise ValueError(f"{name('draft')} and {name('prompt_lookup')} are two ways to draft; choose one")
        if self.num_beams is not None:
            if sampling:
                raise ValueError(f"{name('num_beams')} runs beam search, which does not sample: "
                                 f"{', '.join(map(name, sampling))} cannot be used with it")
            if self.draft is not None or self.prompt_lookup:
                raise ValueError(f"speculative decoding ({name('draft')}, {name('prompt_lookup')}) cannot be "
                                 f"combined with {name('num_beams')}")
        else:
            for n in BEAM_ONLY:
                if getattr(self, n) is not None:
                    raise ValueError(f"{name(n)} needs {name('num_beams')} (it applies only to beam search)")
        if self.mode == "speculative":
            unsupported = [n for n in sampling if n not in SPECULATIVE_SAMPLING]
            if unsupported:
                raise ValueError(f"speculative decoding samples with {_listing([name(n) for n in SPECULATIVE_SAMPLING])} "
                                 f"only; {', '.join(map(name, unsupported))} cannot be used with it")
        elif self.k is not None:
            raise ValueError(f"{name('k')} needs {name('draft')} or {name('prompt_lookup')}")
        if self.ngram is not None and not self.prompt_lookup:
            raise ValueError(f"{name('ngram')} needs {name('prompt_lookup')}")
        return self

    def sampling(self) -> dict:
        """Keyword arguments of `generate` / `stream_generate`, defaults filled in."""
        return {n: default if getattr(self, n) is None else getattr(self, n) for n, default in SAMPLING_DEFAULTS.items()}

    def beam(self) -> dict:
        """Keyword arguments of `beam_search` (but the EOS id)."""
        return dict(num_beams=self.num_beams, num_return_sequences=self.num_return_sequences or self.num_beams,
                    length_penalty=1.0 if self.length_penalty is None else self.length_penalty,
                    early_stopping=EARLY_STOPPING[self.early_stopping or "false"])

    def speculative(self) -> dict:
        """Keyword arguments of `speculative_generate` (but the draft model itself)."""
        sampling = self.sampling()
        return dict(k=4 if self.k is None else self.k, ngram=None if self.draft is not None else self.ngram or 3,
                    **{n: sampling[n] for n in SPECULATIVE_SAMPLING})


"""Chat templates: a model's own Jinja template, rendered the way transformers renders it.

    text = render_chat(template, messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")

A chat template is a Jinja program shipped with a model (`chat_template` in
tokenizer_config.json, `tokenizer.chat_template` in a GGUF file). Models were
fine-tuned on exactly what their template writes, so it is rendered as transformers
renders it, down to the whitespace: an `ImmutableSandboxedEnvironment` (templates
come from the Hub and are untrusted code) with `trim_blocks` and `lstrip_blocks`,
the globals `raise_exception` and `strftime_now`, transformers' `tojson` (no HTML
escaping), the `loopcontrols` extension and the `{% generation %}` tag, which
renders its body. The tokenizers then encode the rendered text with special-token
spellings turned into their ids (`apply_chat_template`), as transformers does.

`CHATML` is the template of models trained here.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

ROLES = ("system", "user", "assistant", "tool")

# ChatML (OpenAI's, used by Qwen and SmolLM): what our own tokenizer's <|im_start|> and <|im_end|> are for.
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Tokens that end a model's turn, besides its EOS: a generation stops at any of them. llama.cpp's list
# (llama-vocab.cpp, "special_eog_ids"), less the tokens only one exotic model uses.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
               "<|end_of_text|>", "<EOT>", "<|return|>", "<|call|>", "<end_of_utterance>")


def end_of_turn_ids(special_tokens: Mapping[str, int]) -> list[int]:
    """The ids of the END_OF_TURN tokens that `special_tokens` holds, in END_OF_TURN's order."""
    return [special_tokens[t] for t in END_OF_TURN if t in special_tokens]


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """`messages` ({"role", "content"} mappings, roles system/user/assistant/tool) rendered by `template`.

    `variables` reach the template as they are (the tokenizer's `bos_token` and `eos_token`, and
    whatever the caller passes, such as `tools`, `documents` or `enable_thinking`). As in
    transformers, keys whose value is None are dropped from each message, `tools` and
    `documents` are always defined (None unless given), and every value is copied into plain
    dicts, lists, strings and numbers first, so a template sees no Python object's methods.
    Every problem is one ValueError naming it: a bad message, a template that calls
    raise_exception, a template that does not compile or fails while rendering."""
    import jinja2

    chat = _check_messages(messages)
    variables = {"tools": None, "documents": None, **variables}
    try:
        compiled = _compile(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template does not compile: {type(e).__name__}: {e}") from None
    try:
        return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt,
                               **{k: _plain(v) for k, v in variables.items()})
    except _TemplateRaised as e:
        raise ValueError(f"the chat template refused these messages: {e}") from None
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template failed while rendering: {type(e).__name__}: {e}") from None
    except (TypeError, KeyError, AttributeError, IndexError) as e:  # e.g. `+` on a str and a list
        raise ValueError(f"the chat template failed while rendering: {type(e).__name__}: {e}") from None


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} mappings, not {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot render an empty conversation: give at least one message")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} is not a {{'role', 'content'}} mapping: {m!r:.200}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; a chat message's role is one of "
                             f"{', '.join(ROLES)}")
        chat.append({k: _plain(v) for k, v in m.items() if v is not None})
    return chat


def _plain(value: Any) -> Any:
    """`value` rebuilt from JSON types only; anything else becomes a placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


class _TemplateRaised(Exception):
    pass


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _TemplateRaisedError(_TemplateRaised, jinja2.TemplateError):
        pass

    def raise_exception(message):
        raise _TemplateRaisedError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: Jinja's own escapes HTML characters, which no model was trained on
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks what the assistant wrote (transformers uses it for
        training masks); here it renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)`, without the type itself (no attribute access to break out by)."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore names, as transformers' does (no reaching CPython internals)."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=TemplateDict())
    return env.from_string(template)

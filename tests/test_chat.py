"""Chat templates: models' own templates rendered exactly as transformers' apply_chat_template renders
them (the string and the ids), ChatML for our tokenizer, and one clear error for each way to fail."""
import json
from datetime import datetime

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

import llmstack.tokenizer
from llmstack.tokenizer import CHATML, Tokenizer, render_chat

SMOLLM2 = (  # SmolLM2-135M-Instruct's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3 = (  # Meta-Llama-3-8B-Instruct's: BOS written by the template, contents trimmed
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

QWEN2 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL = (  # Mistral-7B-Instruct-v0.1's: refuses anything but user/assistant turns in turn
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# What else transformers' environment offers: loop controls, {% generation %}, strftime_now, namespace,
# template variables passed as keyword arguments, whitespace control with trim_blocks/lstrip_blocks.
FEATURES = """{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message.role == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}
    {% else %}{{ ns.n }}: {{ message.content }}
    {% endif %}
{% endfor %}
{% if greeting is defined %}{{ greeting }} {{ strftime_now("%Y") }}{% endif %}
{{ dict(a=1) | tojson }} {{ eos_token }}{% if add_generation_prompt %}>>{% endif %}"""

CORPUS = ["The quick brown fox jumps over the lazy dog. What is 2+2? Hello! Bye.\n" * 5,
          "You are a helpful assistant. Weather in Paris: 22°C, sunny — 東京 🙂\n" * 5,
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n' * 5]

FOLDERS = {  # name: (special tokens, tokenizer_config.json)
    "smollm2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": SMOLLM2}),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN2}),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3}),
    "mistral": (["<unk>", "<s>", "</s>"],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MISTRAL}),
    "features": (["<|endoftext|>"], {"eos_token": "<|endoftext|>", "chat_template": FEATURES}),
    "none": (["<|endoftext|>"], {"eos_token": "<|endoftext|>"}),
}

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello! "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi\n\n"},
     {"role": "assistant", "content": "Hello! 🙂"}, {"role": "user", "content": "<|im_end|> in a message"}],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    for name, (specials, config) in FOLDERS.items():
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        (root / name).mkdir()
        backend.save(str(root / name / "tokenizer.json"))
        (root / name / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                        **config}))
    return root


def _pair(folders, name):
    from transformers import AutoTokenizer

    return llmstack.tokenizer.load(folders / name), AutoTokenizer.from_pretrained(str(folders / name))


def _same(ours, ref, chat, prompt, **kwargs):
    text = ours.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False, **kwargs)
    assert text == ref.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False, **kwargs)
    ids = ours.apply_chat_template(chat, add_generation_prompt=prompt, **kwargs)
    assert ids == ref.apply_chat_template(chat, add_generation_prompt=prompt, return_dict=False, **kwargs)
    return text, ids


@pytest.mark.parametrize("name", ["smollm2", "qwen2", "llama3"])
def test_model_templates_render_as_in_transformers(folders, name):
    ours, ref = _pair(folders, name)
    for chat in CHATS:
        for prompt in (True, False):
            text, ids = _same(ours, ref, chat, prompt)
            assert text.endswith("assistant\n" if name != "llama3" else "assistant<|end_header_id|>\n\n") == prompt
            header = ours.special_tokens["<|im_start|>" if name != "llama3" else "<|start_header_id|>"]
            assert ids.count(header) == text.count(ours.decode([header]))  # each written header is one token
    if name == "llama3":  # the template writes BOS; it comes out as the BOS id, once
        assert ours.apply_chat_template(CHATS[0])[:2] == [ours.bos_id, ours.special_tokens["<|start_header_id|>"]]


def test_tools_and_tool_calls_render_as_in_transformers(folders):
    ours, ref = _pair(folders, "qwen2")
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city, e.g. <b>Paris</b> & 'Köln'",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "22°C, sunny"}, {"role": "tool", "content": "東京: 18°C"}]
    text, _ = _same(ours, ref, chat, True, tools=tools)
    assert "<b>Paris</b> & 'Köln'" in text  # transformers' tojson: no HTML escaping, no \u escapes
    _same(ours, ref, chat, False)


def test_jinja_features_and_variables_render_as_in_transformers(folders):
    ours, ref = _pair(folders, "features")
    text, _ = _same(ours, ref, CHATS[3], True, greeting="hello")
    assert f"hello {datetime.now().year}" in text and text.endswith('{"a": 1} <|endoftext|>>>')
    _same(ours, ref, CHATS[2], False)


def test_template_errors_become_one_clear_value_error(folders):
    ours, ref = _pair(folders, "mistral")
    alternating = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Bye"}]
    _same(ours, ref, alternating, False)
    with pytest.raises(ValueError, match="refused these messages: Conversation roles must alternate"):
        ours.apply_chat_template(alternating[1:])
    with pytest.raises(ValueError, match="Only user and assistant roles are supported"):
        ours.apply_chat_template([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    for template, problem in [("{% for m in messages %}{{ m.content }", "does not compile"),
                              ("{{ messages[0].content + 1 }}", "failed while rendering"),
                              ("{{ messages.__class__.__mro__ }}", "failed while rendering"),
                              ("{% set ns = namespace() %}{% set ns._x = 1 %}", "failed while rendering")]:
        with pytest.raises(ValueError, match=problem):
            render_chat(template, CHATS[0])


@pytest.mark.parametrize("messages,problem", [
    ([{"role": "robot", "content": "beep"}], "role 'robot'; a chat message's role is one of system, user, "),
    ([{"role": "user"}], r"message 0 is not a \{'role', 'content'\} mapping"),
    ([{"role": "user", "content": "hi"}, "hello"], r"message 1 is not a \{'role', 'content'\} mapping"),
    ([{"text": "hi"}], r"message 0 is not a \{'role', 'content'\} mapping"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
    ("hello", "messages must be a list"),
    ([], "empty conversation"),
])
def test_bad_messages_are_named(folders, messages, problem):
    ours = llmstack.tokenizer.load(folders / "smollm2")
    with pytest.raises(ValueError, match=problem):
        ours.apply_chat_template(messages)
    with pytest.raises(ValueError, match=problem):
        Tokenizer.train(CORPUS, 300).apply_chat_template(messages)


def test_a_tokenizer_without_template_says_so(folders):
    with pytest.raises(ValueError, match="no chat template"):
        llmstack.tokenizer.load(folders / "none").apply_chat_template(CHATS[0])


def test_our_chatml_renders_as_transformers_renders_chatml(folders):
    ours = Tokenizer.train(CORPUS, 300)
    _, ref = _pair(folders, "qwen2")
    assert ours.chat_template == CHATML
    for chat in CHATS:
        for prompt in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False) == \
                ref.apply_chat_template(chat, chat_template=CHATML, add_generation_prompt=prompt, tokenize=False)

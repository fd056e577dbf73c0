"""Chat templates render exactly as transformers' `apply_chat_template` renders them.

The templates below are written here in the style of the Llama 3.1, Qwen 2.5 and Mistral (v0.3, tool-calling)
templates: they use what those use — `tojson` on tool schemas (HTML characters, unsorted keys, non-ASCII),
`strftime_now`, `raise_exception`, loop controls, namespaces, tool calls and tool results, `documents`. The default
model's own template (SmolLM2, from its GGUF) is checked in the slow test at the end.
"""

import pytest

from models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "Use the following functions:\\n\\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {%- for call in message.tool_calls %}
            {{- '{"name": "' + call.function.name + '", "parameters": ' }}{{- call.function.arguments | tojson }}{{- "}" }}
        {%- endfor %}
        {{- "<|eot_id|>" }}
    {%- elif message.role == 'tool' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace(index=0) %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or (message.tool_calls is defined and message.tool_calls)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, roles must alternate user/assistant") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- tool | tojson }}{%- if not loop.last %}{{- ", " }}{%- endif %}
            {%- endfor %}
            {{- "][/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function | tojson %}
            {{- out[:-1] + ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token }}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# Uses `documents` (RAG templates such as Command-R's take them) and loop controls.
DOCUMENTS = """{%- for m in messages %}{%- if m.role == 'skip' %}{% continue %}{% endif %}<{{ m.role }}>{{ m.content }}
{% endfor %}
{%- if documents %}{%- for d in documents %}[doc {{ loop.index }}] {{ d | tojson }}
{% endfor %}{%- endif %}
{%- if add_generation_prompt %}<assistant>{% endif %}"""

# A schema with what jinja2's stock tojson would change: HTML characters, non-ASCII, keys out of sorted order.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city; returns <b>temp</b> & 'sky' in °C",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
            },
        },
    }
]
CALL = {"id": "abc123def", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Zürich? <now> & 'then'"},
]
TOOL_CHAT = [
    *CHAT,
    {"role": "assistant", "tool_calls": [CALL], "content": ""},
    {"role": "tool", "tool_call_id": "abc123def", "name": "get_weather", "content": '{"temp": 21, "sky": "<clear>"}'},
    {"role": "assistant", "content": "21 °C and clear."},
    {"role": "user", "content": "Thanks!"},
]


def _pair(template: str) -> tuple[Tokenizer, object]:
    """Our tokenizer and transformers' over the same vocabulary and template."""
    ours = Tokenizer.bytes()
    ours.chat_template = template
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_object=ours.tok, bos_token="<s>", eos_token="</s>", chat_template=template
    )
    return ours, ref


@pytest.mark.parametrize("template", [LLAMA3, QWEN25, MISTRAL], ids=["llama3", "qwen2.5", "mistral"])
@pytest.mark.parametrize("messages", [CHAT, TOOL_CHAT], ids=["chat", "tool-calls"])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "no-gen"])
def test_template_renders_as_transformers(template, messages, tools, gen):
    ours, ref = _pair(template)
    want = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools) == want


def test_tojson_keeps_html_and_key_order_and_strftime_now_is_today():
    ours, _ = _pair(LLAMA3)
    text = ours.apply_chat_template(CHAT, tools=TOOLS)
    assert "returns <b>temp</b> & 'sky' in °C" in text  # jinja2's own tojson writes \\u003cb\\u003e ... \\u0026
    assert text.index('"type": "function"') < text.index('"function": {')  # unsorted
    assert "Today Date: " in text and "strftime_now" not in text


def test_documents_and_extra_variables_reach_the_template():
    ours, ref = _pair(DOCUMENTS)
    docs = [{"title": "<a & b>", "text": "Zürich"}]
    msgs = [*CHAT, {"role": "skip", "content": "x"}]
    want = ref.apply_chat_template(msgs, documents=docs, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(msgs, documents=docs) == want


def test_raise_exception_is_a_clear_error():
    ours, _ = _pair(MISTRAL)
    with pytest.raises(ValueError, match="chat template: After the optional system message, roles must alternate"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.slow
def test_default_model_template_renders_as_transformers(smollm2_gguf):
    from models.gguf import load_gguf

    _, _, ours = load_gguf(smollm2_gguf)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for messages in (CHAT, TOOL_CHAT):
        for tools in (None, TOOLS):
            want = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
            assert ours.apply_chat_template(messages, tools=tools) == want

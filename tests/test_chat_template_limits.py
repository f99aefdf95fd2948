"""Chat templates render as in transformers, and a hostile one is stopped with a one-line error (issue 20, item 5).

The export folder's chat template is untrusted: jinja2's sandbox already refuses code execution; these tests cover
what it does not, runaway loops, recursion, huge values and output, and tags that load other templates.
"""

from __future__ import annotations

import copy
import tracemalloc

import pytest

from vlm_export.errors import InputError, ManifestError
from vlm_export.runtime import chat
from vlm_export.runtime.template_sandbox import RenderLimits
from vlm_export.testing import chat_templates

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision")
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

CONVERSATIONS = [
    chat_templates.REFERENCE_CONVERSATION,
    chat_templates.LLAVA_ONEVISION_CHAT_CONVERSATION,
    *(conversation for conversation, _ in chat_templates.LLAVA_ONEVISION_DOC_EXAMPLES),
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "and this?"}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "A cat."}],
            "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1, 2]}}}],
        },
        {"role": "tool", "content": [{"type": "text", "text": "42"}]},
        {"role": "user", "content": [{"type": "video", "path": "v.mp4"}, {"type": "text", "text": "x" * 5000}]},
    ],
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kwargs", [{}, {"add_vision_id": True}, {"tools": TOOLS}], ids=["plain", "vision_id", "tools"])
def test_real_templates_render_as_in_transformers(family, kwargs):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    template = chat_templates.chat_template_for(family)
    conversations = [*CONVERSATIONS, [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]]
    if family == "llava_onevision":  # its template drops string content: see the next test
        conversations = [c for c in conversations if not any(isinstance(m["content"], str) for m in c)]
    for conversation in conversations:
        rendered, _ = render_jinja_template(
            conversations=[copy.deepcopy(conversation)], chat_template=template, add_generation_prompt=True, **kwargs
        )
        assert chat.render_chat(template, copy.deepcopy(conversation), **kwargs) == rendered[0]


def test_string_content_a_template_would_drop_becomes_a_text_part():
    template = chat_templates.chat_template_for("llava_onevision")
    as_string = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
    as_parts = [
        {"role": r, "content": [{"type": "text", "text": t}]} for r, t in (("system", "sys"), ("user", "hello"))
    ]
    assert chat.render_chat(template, as_string) == chat.render_chat(template, as_parts)
    assert "hello" in chat.render_chat(template, as_string)


TIGHT = RenderLimits(seconds=30.0, steps=200_000, value_chars=1 << 20, output_chars=4 << 20)

# name: (template, what stops it). Sizes are chosen so that a missing pre-check would allocate far more than the
# tracemalloc bound below, not just fail later.
STOPPED = {
    "nested loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    "huge range": ("{% for a in range(10**9) %}{% endfor %}", "range"),
    "range to list": ("{{ range(1000000)|list|length }}", "range"),
    "string repetition": ("{{ 'x' * 10**10 }}", "`*` repetition"),
    "big power": ("{{ (2**60)**(2**20) }}", "bits"),
    "center filter": ("{{ 'x'|center(10**9) }}", "filter center"),
    "ljust method": ("{{ 'x'.ljust(999999999) }}", "str.ljust"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", "str.format"),
    "percent width": ("{{ '%999999999d' % 1 }}", "`%` formatting"),
    "percent star": ("{{ '%*d' % (999999999, 1) }}", "`%` formatting"),
    "format filter": ("{{ '%999999999d'|format(1) }}", "filter format"),
    "replace": ("{% set s = 'x' * 100000 %}{{ s.replace('', s) }}", "str.replace"),
    "replace filter": ("{% set s = 'x' * 100000 %}{{ s|replace('', s) }}", "filter replace"),
    "join separator": ("{% set s = 'x' * 1000000 %}{{ range(1000)|join(s) }}", "join would"),
    "join method": ("{% set s = 'x' * 1000000 %}{{ s.join(range(1000)|map('string')) }}", "str.join"),
    "translate": ("{% set s = 'x' * 100000 %}{{ s.translate({120: s}) }}", "str.translate"),
    "expandtabs": ("{% set s = '\t' * 100000 %}{{ s.expandtabs(1000) }}", "str.expandtabs"),
    "strip with long chars": (
        "{% set s = 'y' * 100000 %}{% set c = 'x' * 100000 ~ 'y' %}{{ s.strip(c) }}",
        "str.strip",
    ),
    "namespace doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "concatenation",
    ),
    "set doubling": ("{% set s = 'xxxxxxxxxxxxxxxx' %}" + "{% set s = s ~ s %}" * 40, "concatenation"),
    "recursion doubling": (
        "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ d('x', 60) }}",
        "concatenation",
    ),
    "macro recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "calls nest deeper"),
    "recursive loop": ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "calls nest deeper"),
    "output flood": ("{% for a in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output more than"),
    "block capture flood": (
        "{% set s = 'x' * 1000000 %}{% set b %}{% for a in range(1000) %}{{ s }}{% endfor %}{% endset %}",
        "output more than",
    ),
    "list of references": ("{% set s = 'x' * 800000 %}{{ [s, s, s, s, s, s, s, s, s, s] }}", "an output would"),
    "batch fill": ("{{ [1]|batch(1000000000, 'x')|list }}", "filter batch"),
    "slice count": ("{{ [1]|slice(1000000)|list }}", "filter slice"),
    "indent width": ("{% set s = '\n' * 100000 %}{{ s|indent(1000) }}", "filter indent"),
    "wordwrap long word": ("{{ ('x' * 1000000)|wordwrap(1) }}", "filter wordwrap"),
    "lipsum": ("{{ lipsum(1000000) }}", "lipsum"),
    "huge int parse": ("{{ ('9' * 100000)|int }}", "filter int"),
    "integer squaring": (
        "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
        "bits",
    ),
    "sum of lists": ("{{ (range(10000)|map('string')|list|batch(1)|list)|sum(start=[]) }}", "filter sum"),
    "tojson indent": ("{{ messages|tojson(indent=10**9) }}", "filter tojson"),
}
FAILING = {  # not limits, but still tracebacks before: every exception of a render is one line
    "division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "type error": ("{{ messages + 1 }}", "TypeError"),
    "unsafe attribute": ("{{ ''.__class__.__mro__ }}", "unsafe"),
    "raise_exception": ("{{ raise_exception('no system messages') }}", "no system messages"),
}


@pytest.mark.parametrize(("template", "reason"), list(STOPPED.values()), ids=list(STOPPED))
def test_hostile_templates_are_stopped(template, reason, monkeypatch):
    """Stopped for the expected reason (not by a later, slower limit), before allocating much (tracemalloc)."""
    monkeypatch.setattr(chat, "DEFAULT_LIMITS", TIGHT)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="the chat template was stopped") as error:
            chat.render_chat(template, MESSAGES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert peak < 64 << 20, f"{peak >> 20} MiB allocated before the render was stopped"


@pytest.mark.parametrize(("template", "needle"), list(FAILING.values()), ids=list(FAILING))
def test_failing_templates_are_one_line_input_errors(template, needle):
    with pytest.raises(InputError, match=needle) as error:
        chat.render_chat(template, MESSAGES)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "template",
    ["{% include 'x.jinja' %}", "{% import 'x.jinja' as x %}", "{% from 'x.jinja' import y %}", "{% extends 'x' %}"],
)
def test_templates_that_load_others_are_refused_at_compile_time(template):
    with pytest.raises(ManifestError, match="which a chat template cannot use"):
        chat.render_chat(template, MESSAGES)


def test_syntax_errors_and_oversized_templates_are_manifest_errors():
    with pytest.raises(ManifestError, match="not valid Jinja"):
        chat.render_chat("{% for %}", MESSAGES)
    with pytest.raises(ManifestError, match="characters"):
        chat.render_chat("x" * (2 << 20), MESSAGES)


def test_the_deadline_stops_a_render(monkeypatch):
    monkeypatch.setattr(chat, "DEFAULT_LIMITS", RenderLimits(seconds=0.0))
    with pytest.raises(InputError, match=r"ran longer than 0 s"):
        chat.render_chat("{% for a in range(10) %}{{ a }}{% endfor %}", MESSAGES)


def test_limits_scale_with_the_messages():
    """A long prompt is not a hostile template: the size limits grow with the size of the messages."""
    text = "word " * 1_000_000  # 5 MB of text, above the fixed part of the per-value limit
    template = chat_templates.chat_template_for("qwen2_5_vl")
    rendered = chat.render_chat(template, [{"role": "user", "content": [{"type": "text", "text": text}]}])
    assert text in rendered

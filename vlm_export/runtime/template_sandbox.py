"""A jinja2 sandbox that renders untrusted chat templates within a budget of time, steps and sizes.

A chat template comes with the export folder, which may come from someone else: jinja2's sandbox (the one
transformers' `apply_chat_template` uses) stops it from running code, but not from looping forever or building
gigabyte strings. So every render here has a budget (:class:`RenderLimits`): wall-clock time, steps (loop
iterations, calls, filters, outputs), call depth, the size of any one value, and the total output. The template is
instrumented at compile time (its syntax tree, through jinja2's public `parse` / `compile` / `Template.from_code`)
so that every loop iteration, assignment, `~` concatenation and output is metered, and the operations that can
multiply a size in one step (`*`, `**`, `%`, `str.format`, `ljust`, `replace`, `join`, `strip(chars)`, the padding
and wrapping filters...) check the size or cost of their result before building it: one operation costs at most
about the size limit, and the deadline is checked between operations. `include`, `import` and `extends` are refused
at compile time (a chat template has nothing to include). Within the budget, the output is exactly what
transformers renders (same environment options, filters and globals; no constant folding, which changes nothing
but when expressions are evaluated).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from vlm_export.errors import ManifestError

MAX_TEMPLATE_CHARS = 1 << 20  # real chat templates are a few KiB
MAX_RANGE = 100_000  # jinja2's sandbox limit, kept so that templates within it render as in transformers
MAX_INT_BITS = 1 << 16
MAX_NESTING = 64  # deepest container nesting measured


@dataclass(frozen=True)
class RenderLimits:
    """What one render may use. Sizes count characters (or items); the `per_input_char` terms scale them with the
    size of the messages, so a long prompt never hits a limit a short one would not."""

    seconds: float = 5.0
    steps: int = 1_000_000
    depth: int = 64
    value_chars: int = 4 << 20
    output_chars: int = 16 << 20
    value_per_input_char: int = 2
    output_per_input_char: int = 8


DEFAULT_LIMITS = RenderLimits()


class RenderLimitError(Exception):
    """A render ran out of its budget (not a `TemplateError`, so nothing in jinja2 catches it)."""


@dataclass
class _Budget:
    limits: RenderLimits
    input_chars: int
    deadline: float = 0.0
    steps: int = 0
    depth: int = 0
    output_left: int = 0
    value_cap: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.deadline = self.started + self.limits.seconds
        self.steps = self.limits.steps
        self.value_cap = self.limits.value_chars + self.limits.value_per_input_char * self.input_chars
        self.output_left = self.limits.output_chars + self.limits.output_per_input_char * self.input_chars

    def tick(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise RenderLimitError(f"it ran more than {self.limits.steps:,} steps (loop iterations and calls)")
        if time.monotonic() > self.deadline:
            raise RenderLimitError(f"it ran longer than {self.limits.seconds:g} s")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("vlm_export_chat_budget", default=None)
_UNMETERED = _Budget(RenderLimits(seconds=float("inf"), steps=1 << 62, output_chars=1 << 62), 0)  # not rendering


def _budget() -> _Budget:
    return _BUDGET.get() or _UNMETERED


# -- sizes ---------------------------------------------------------------------------------------------------


def _size(value: Any, cap: int, depth: int = 0) -> int:
    """Characters `str(value)` would have, roughly (containers: their items' sizes), counted up to just past
    `cap`: big values cost no more than `cap` to measure."""
    if isinstance(value, str | bytes | bytearray):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    if isinstance(value, float):
        return 24
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")
    if isinstance(value, Mapping):
        value = [item for pair in value.items() for item in pair]
    if isinstance(value, list | tuple | set | frozenset):
        if depth > MAX_NESTING:
            return cap + 1
        total = len(value)
        for item in value:
            if total > cap:
                break
            total += 2 + _size(item, cap - total, depth + 1)
        return total
    return 32  # Undefined, macros, loop objects, range objects: short reprs


def _check_size(size: int, what: str) -> None:
    cap = _budget().value_cap
    if size > cap:
        raise RenderLimitError(f"{what} would hold about {size:,} characters or items (the limit is {cap:,})")


def _checked(value: Any, what: str = "a value") -> Any:
    _check_size(_size(value, _budget().value_cap), what)
    return value


def _check_int(value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise RenderLimitError(f"an integer would have {value.bit_length():,} bits (the limit is {MAX_INT_BITS:,})")


def _format_size(template: str, args: Iterable[Any]) -> int:
    """Upper bound of a `%` or `str.format` result: the format, its arguments, and every width it names."""
    cap = _budget().value_cap
    fields = template.count("%") + template.count("{")
    widths = [int(n) for n in re.findall(r"\d+", template)] or [0]
    numbers = [abs(a) for a in args if isinstance(a, int) and not isinstance(a, bool)] or [0]
    width = max(max(widths), max(numbers) if "*" in template else 0)
    return len(template) + fields * width + sum(_size(a, cap) for a in args)


# -- checked operations --------------------------------------------------------------------------------------


def _binop_size(operator: str, left: Any, right: Any) -> None:
    """Refuse before computing an operator result that would exceed the limits."""
    if operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
        bits = left.bit_length() + right.bit_length() if operator == "*" else left.bit_length() * max(right, 0)
        if bits > MAX_INT_BITS:
            raise RenderLimitError(f"`{operator}` would give an integer of about {bits:,} bits")
    elif operator == "*":
        sequence, count = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(sequence, str | list | tuple) and isinstance(count, int):
            _check_size(len(sequence) * max(count, 0), "`*` repetition")
    elif operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
        _check_size(len(left) + len(right), "`+`")
    elif operator == "%" and isinstance(left, str):
        args = right if isinstance(right, tuple) else (right,)
        _check_size(_format_size(left, args), "`%` formatting")


_STRING_METHODS = frozenset(
    {"ljust", "rjust", "center", "zfill", "expandtabs", "replace", "join", "translate", "strip", "lstrip", "rstrip"}
)
#: Character comparisons one operation may cost where it grows as a product of two sizes (`strip(chars)`, the sum
#: of lists), which a single C call would run to completion whatever the deadline.
MAX_PRODUCT_WORK = 10**8


def _check_method(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Size checks for the str methods whose result can be far larger than their inputs; returns the args to use
    (a `join` argument is materialized so it can be measured)."""
    owner = getattr(method, "__self__", None)
    wrapped = getattr(method, "__wrapped__", None)  # the sandbox wraps str.format / str.format_map
    if wrapped is not None and isinstance(getattr(wrapped, "__self__", None), str):
        values = [*args, *kwargs.values()]
        if wrapped.__name__ == "format_map" and args and isinstance(args[0], Mapping):
            values = list(args[0].values())
        _check_size(_format_size(wrapped.__self__, values), "str.format")
        return args
    name = getattr(method, "__name__", "")
    if not isinstance(owner, str) or name not in _STRING_METHODS:
        return args
    cap = _budget().value_cap
    if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        _check_size(args[0], f"str.{name}")
    elif name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _check_size(len(owner) + owner.count("\t") * max(tab, 0), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_size(_replace_size(owner, args[0], args[1], args[2] if len(args) > 2 else -1), "str.replace")
    elif name == "join" and args:
        items = _materialize(args[0])
        _check_size(sum(_size(item, cap) for item in items) + len(owner) * max(len(items) - 1, 0), "str.join")
        return (items, *args[1:])
    elif name in ("strip", "lstrip", "rstrip") and args and isinstance(args[0], str):
        _check_work(len(owner) * len(args[0]), f"str.{name}")
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((_size(v, cap) for v in args[0].values()), default=1)
        _check_size(len(owner) * max(longest, 1), "str.translate")
    return args


def _check_work(work: int, what: str) -> None:
    if work > MAX_PRODUCT_WORK:
        raise RenderLimitError(
            f"{what} would cost about {work:,} character comparisons (the limit is {MAX_PRODUCT_WORK:,})"
        )


def _materialize(iterable: Any) -> list[Any]:
    budget = _budget()
    items = []
    for item in iterable:
        budget.tick()
        items.append(item)
        if len(items) > budget.value_cap:
            raise RenderLimitError(f"a sequence would hold more than {budget.value_cap:,} items")
    return items


def _replace_size(text: str, old: str, new: str, count: Any = -1) -> int:
    if len(new) <= len(old):
        return len(text)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _bounded_iter(iterable: Any) -> Iterator[Any]:
    """A `for` loop's iterable, one step of the budget per item."""
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _bounded_range(*args: Any) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise RenderLimitError(f"range{args} has {len(numbers):,} items (the limit is {MAX_RANGE:,})")
    return numbers


def _concat(parts: list[Any]) -> str:
    """`a ~ b ~ ...` (jinja2's Concat), measured before it is built."""
    budget = _budget()
    budget.tick()
    _check_size(sum(_size(part, budget.value_cap) for part in parts), "`~` concatenation")
    return "".join(str(part) for part in parts)


@jinja2.pass_eval_context  # needing a context keeps jinja2 from evaluating outputs at compile time
def _finalize(eval_ctx: Any, value: Any) -> Any:
    """Every output (`{{ }}` and template text) is metered against the render's total output."""
    budget = _budget()
    budget.tick()
    size = _size(value, budget.value_cap)
    _check_size(size, "an output")
    budget.output_left -= size
    if budget.output_left < 0:
        total = budget.limits.output_chars + budget.limits.output_per_input_char * budget.input_chars
        raise RenderLimitError(f"it output more than {total:,} characters")
    return value


class _MeteredNamespace(Namespace):
    """`namespace()`: the only state a template can carry from one loop iteration to the next, so its values are
    measured when set (a value doubled each iteration stops at the size limit)."""

    def __setitem__(self, name: str, value: Any) -> None:
        _budget().tick()
        _check_int(value)
        super().__setitem__(name, _checked(value, f"namespace value {name!r}"))


# -- filters and helpers -------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    if isinstance(indent, int) and indent > 64:
        raise RenderLimitError(f"tojson(indent={indent}) (the limit is 64)")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _capped_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if not all(isinstance(v, int) and abs(v) <= 1000 for v in (n, min, max)):
        raise RenderLimitError("lipsum() asked for more than 1,000 paragraphs or words")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _filter_amplification(name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Pre-checks of the built-in filters whose result can be far larger than their inputs."""
    cap = _budget().value_cap
    numbers = [a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
    if any(abs(n) > cap for n in numbers):
        raise RenderLimitError(f"filter {name} got the number {max(numbers, key=abs):,} (the limit is {cap:,})")
    text = value if isinstance(value, str) else None
    if name in ("batch", "slice") and numbers and abs(numbers[0]) > MAX_RANGE:
        raise RenderLimitError(f"filter {name}({numbers[0]:,}) (the limit is {MAX_RANGE:,})")
    if text is None:
        return
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        pad = width if isinstance(width, int) else len(str(width))
        _check_size(len(text) + (text.count("\n") + 1) * pad, "filter indent")
    elif name == "wordwrap":
        width = args[0] if args else kwargs.get("width", 79)
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        if isinstance(width, int):
            # textwrap copies the rest of a long word for every piece it breaks off: about n * n / width bytes
            _check_work(len(text) * len(text) // max(width, 1) // 400, "filter wordwrap")
        if isinstance(width, int) and isinstance(wrap, str):
            _check_size(len(text) + (len(text) // max(width, 1) + 1) * len(wrap), "filter wordwrap")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_size(_replace_size(text, args[0], args[1], args[2] if len(args) > 2 else -1), "filter replace")
    elif name == "format":
        _check_size(_format_size(text, [*args, *kwargs.values()]), "filter format")
    elif name == "trim" and len(args) >= 1 and isinstance(args[0], str):
        _check_work(len(text) * len(args[0]), "filter trim")
    elif name == "int" and len(text) > 4300:  # Python 3.10 parses huge int strings in quadratic time
        raise RenderLimitError(f"filter int got a {len(text):,}-character number")


def _guard_filter(name: str, func: Any) -> Any:
    """`func` with the budget's checks around it (keeps jinja2's pass_context / pass_environment marker)."""
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        values = args[skip:]
        for value in (*values, *kwargs.values()):
            _checked(value, f"the input of filter {name}")
        if values:
            _filter_amplification(name, values[0], values[1:], kwargs)
        if name == "sum" and values:
            items = _materialize(values[0])
            start = values[2] if len(values) > 2 else kwargs.get("start", 0)
            if isinstance(start, str | list | tuple) or any(isinstance(item, str | list | tuple) for item in items):
                total = _size(start, budget.value_cap) + sum(_size(item, budget.value_cap) for item in items)
                _check_size(total, "filter sum")
                _check_work(total * len(items), "filter sum")  # each + copies the sum so far
            args = (*args[:skip], items, *values[1:])
        if name == "join" and values:
            separator = values[1] if len(values) > 1 else kwargs.get("d", "")
            items = _materialize(values[0])
            _check_size(sum(_size(i, budget.value_cap) for i in items) + len(str(separator)) * len(items), "join")
            args = (*args[:skip], items, *values[1:])
        result = func(*args, **kwargs)
        if isinstance(result, str | list | tuple | dict):
            _check_size(len(result), f"the result of filter {name}")
        return result

    return guarded


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment with every operation metered against the current render's budget."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
            optimized=False,  # no constant folding: every expression is evaluated, and metered, at render time
            finalize=_finalize,
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, func) for name, func in self.filters.items()}
        self.filters["_vlm_loop"] = _bounded_iter
        self.filters["_vlm_concat"] = _concat
        self.filters["_vlm_value"] = _checked
        self.globals.update(
            range=_bounded_range,
            namespace=_MeteredNamespace,
            lipsum=_capped_lipsum,
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _budget().tick()
        _binop_size(operator, left, right)
        result = self.binop_table[operator](left, right)
        _check_int(result)
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        for value in (*args, *kwargs.values()):
            _checked(value, "a call's argument")
        args = _check_method(__obj, args, kwargs)
        if isinstance(__obj, LoopContext) and args:  # `loop(children)` in a recursive for loop
            args = (_bounded_iter(args[0]), *args[1:])
        budget.depth += 1
        try:
            if budget.depth > budget.limits.depth:
                raise RenderLimitError(f"calls nest deeper than {budget.limits.depth} (runaway recursion?)")
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        _check_int(result)
        if isinstance(result, str | list | tuple | dict):
            _check_size(len(result), "a call's result")
        return result


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in transformers; when
    rendering a prompt it only outputs its body."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


_REFUSED_TAGS = {
    jinja2.nodes.Include: "include",
    jinja2.nodes.Import: "import",
    jinja2.nodes.FromImport: "from ... import",
    jinja2.nodes.Extends: "extends",
}


def _filter(node: jinja2.nodes.Expr, name: str) -> jinja2.nodes.Filter:
    return jinja2.nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Instrument(NodeTransformer):
    """Rewrites a template's syntax tree so that loops, assignments, concatenations and template text are metered:
    each `for` iterates through `_vlm_loop`, each `set` value passes `_vlm_value`, each `a ~ b` becomes
    `_vlm_concat([a, b])`, and template text becomes a constant output, which jinja2 passes to `finalize`."""

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        node.iter = _filter(node.iter, "_vlm_loop")
        return node

    def visit_Assign(self, node: jinja2.nodes.Assign) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        node.node = _filter(node.node, "_vlm_value")
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        return _filter(jinja2.nodes.List(list(node.nodes), lineno=node.lineno), "_vlm_concat")

    def visit_TemplateData(self, node: jinja2.nodes.TemplateData) -> jinja2.nodes.Node:
        return jinja2.nodes.Const(node.data, lineno=node.lineno)


def _instrument(tree: jinja2.nodes.Template) -> jinja2.nodes.Template:
    for kind, tag in _REFUSED_TAGS.items():
        found = next(iter(tree.find_all(kind)), None)
        if found is not None:
            raise ManifestError(
                f"the chat template uses {{% {tag} %}} (line {found.lineno}), which a chat template cannot use: "
                "it has no other templates to load; fix chat_template.jinja or re-export the model"
            )
    return _Instrument().visit(tree)


@functools.cache
def _environment() -> BoundedSandbox:
    return BoundedSandbox()


@lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
    """The instrumented template; `ManifestError` for one that is too large, does not parse, or loads others."""
    if not isinstance(template, str):
        raise ManifestError(f"the chat template must be text, not {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ManifestError(
            f"the chat template has {len(template):,} characters (the limit is {MAX_TEMPLATE_CHARS:,}); "
            "fix chat_template.jinja or re-export the model"
        )
    env = _environment()
    try:
        code = env.compile(_instrument(env.parse(template)))
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ManifestError(
            f"the chat template is not valid Jinja (line {error.lineno}: {_one_line(error)}); fix chat_template.jinja "
            "or re-export the model"
        ) from None
    except RecursionError:
        raise ManifestError("the chat template nests too deeply to compile; fix chat_template.jinja") from None
    return env.template_class.from_code(env, code, env.make_globals(None), None)


@contextlib.contextmanager
def render_budget(limits: RenderLimits, input_chars: int) -> Iterator[None]:
    """Meter every template evaluated in this block (this thread / task) against one budget."""
    token = _BUDGET.set(_Budget(limits, input_chars))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."

"""Property-based tests over the runtime's input surface (issue 20): for any image bytes, video container, message
structure, sampling setting, manifest or chat template, the runtime gives a result or an `InputError` /
`ManifestError`, never anything else, within bounded time and memory.

CI runs a fixed, derandomized set of examples per property (the file stays well under a minute once the session's
tiny export exists); each property has a `slow` twin that draws 20x more fresh examples and runs only when asked
for: `pytest -m slow tests/test_fuzz_runtime.py` (about 25 minutes on 2 cores).
"""

from __future__ import annotations

import copy
import io
import json
import resource
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vlm_export.errors import InputError, ManifestError  # noqa: E402

ALLOWED = (InputError, ManifestError)
#: Per example. Generous: a property fails on a hang or a runaway allocation, not on a slow machine.
DEADLINE_MS = 20_000
MAX_RSS_GROWTH = 1536 << 20  # bytes the process's peak RSS may grow during one example


def deep(test: Callable) -> Callable:
    """The `slow` twin of a property: collected always, run only when asked for with `-m slow` (CI runs the
    bounded twins; other `slow` tests of the suite do run in CI, these would take half an hour)."""
    asked = "'slow' in (config.getoption('markexpr') or '')"
    return pytest.mark.slow(pytest.mark.skipif(f"not ({asked})", reason="deep fuzzing: run with -m slow")(test))


def fuzz(strategy: st.SearchStrategy, examples: int) -> Callable:
    """Two tests from one property: a derandomized CI one with `examples` draws and a `slow` one with 20x more."""

    def decorate(check: Callable[..., None]):
        common = {
            "deadline": DEADLINE_MS,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
            "database": None,
        }
        ci = settings(max_examples=examples, derandomize=True, **common)(given(strategy)(check))
        slow = deep(settings(max_examples=examples * 20, **common)(given(strategy)(check)))
        return ci, slow

    return decorate


def outcome(run: Callable[[], Any]) -> Any:
    """Run one example: any exception other than the allowed ones fails the property, as does a memory spike."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        result = run()
    except ALLOWED as error:
        assert "\n" not in str(error), str(error)
        result = error
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MAX_RSS_GROWTH, f"peak RSS grew by {grown >> 20} MiB"
    return result


@pytest.fixture(autouse=True, scope="module")
def _small_decompression_limit():
    """Pillow's own guard bounds image memory; lowered here so that mutated headers cannot ask for 500 MB."""
    saved = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = 4_000_000
    yield
    PIL.Image.MAX_IMAGE_PIXELS = saved


# -- strategies ---------------------------------------------------------------------------------------------------


def mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Valid files with bytes flipped, cut, duplicated or inserted, plus raw random bytes."""

    @st.composite
    def mutate(draw) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 6))):
            if not data:
                break
            kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "int"]))
            at = draw(st.integers(0, len(data) - 1))
            if kind == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif kind == "cut":
                del data[at : at + draw(st.integers(1, 4096))]
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=64))
            elif kind == "repeat":
                data[at:at] = data[at : at + draw(st.integers(1, 512))]
            else:  # a header field set to an extreme value
                data[at : at + 4] = draw(
                    st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
                )
        return bytes(data)

    return st.one_of(mutate(), st.binary(max_size=2048))


def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    seeds = []
    for fmt, mode in (
        ("PNG", "RGB"),
        ("PNG", "P"),
        ("JPEG", "RGB"),
        ("GIF", "P"),
        ("WEBP", "RGB"),
        ("BMP", "RGB"),
        ("TIFF", "RGB"),
        ("PNG", "LA"),
    ):
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
        seeds.append(buffer.getvalue())
    return seeds


def _video_seeds() -> list[tuple[str, bytes]]:
    pytest.importorskip("av")
    from vlm_export.testing.videos import write_test_video

    with tempfile.TemporaryDirectory() as folder:
        seeds = []
        for suffix, codec in ((".mp4", "mpeg4"), (".mkv", "ffv1"), (".avi", "mpeg4")):
            path = write_test_video(Path(folder) / f"seed{suffix}", num_frames=12, width=40, height=30, codec=codec)
            seeds.append((suffix, path.read_bytes()))
    return seeds


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
texts = st.one_of(st.text(max_size=200), st.sampled_from(["<|image_pad|>", "<|im_end|>", "\udce9", "\x00", "{{ x }}"]))
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(texts, json_scalars)}),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["image", "image_url", "video", "audio", "text", None])},
        optional={
            "image": json_values,
            "path": st.one_of(st.text(max_size=30), json_scalars),
            "url": json_values,
            "video": json_values,
            "text": json_values,
            "fps": json_scalars,
            "num_frames": json_scalars,
        },
    ),
    json_values,
)
messages = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), json_scalars)},
    optional={"content": st.one_of(texts, st.lists(parts, max_size=4), json_values), "tool_calls": json_values},
)
conversations = st.one_of(st.lists(messages, min_size=1, max_size=5), json_values)

setting_values = st.one_of(
    json_scalars,
    st.sampled_from([0, 1, -1, 1e-40, 1e-30, 1e30, 1e300, float("nan"), float("inf"), 0.5, 2**63]),
    st.lists(st.integers(-5, 200_000), max_size=3),
)
sampling_settings = st.dictionaries(
    st.sampled_from(
        [
            "max_new_tokens",
            "do_sample",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "seed",
            "eos_token_id",
            "pad_token_id",
        ]
    ),
    setting_values,
    max_size=6,
)


# -- properties ---------------------------------------------------------------------------------------------------

IMAGE_SEEDS = _image_seeds()


def _image_case(data: bytes) -> None:
    from vlm_export.runtime.image_io import load_image

    result = outcome(lambda: load_image(data))
    assert isinstance(result, (PIL.Image.Image, InputError)), type(result)
    if isinstance(result, PIL.Image.Image):
        assert result.mode == "RGB"


test_image_bytes, test_image_bytes_slow = fuzz(mutations(IMAGE_SEEDS), 60)(_image_case)


@pytest.fixture(scope="module")
def video_seeds() -> list[tuple[str, bytes]]:
    return _video_seeds()


def _video_property(pipe, seeds):
    def check(case) -> None:
        index, data, options = case
        suffix = seeds[index % len(seeds)][0]
        with tempfile.NamedTemporaryFile(suffix=suffix) as file:
            file.write(data)
            file.flush()
            item_options = {k: v for k, v in options.items() if v is not None}
            conversation = [
                {
                    "role": "user",
                    "content": [{"type": "video", "path": file.name, **item_options}, {"type": "text", "text": "x"}],
                }
            ]
            result = outcome(lambda: pipe.prepare([conversation]))
        assert isinstance(result, (tuple, InputError)), type(result)

    return check


video_options = st.fixed_dictionaries(
    {}, optional={"fps": st.one_of(st.floats(-1, 100), st.just(float("nan"))), "num_frames": st.integers(-2, 40)}
)


def test_video_containers(qwen2_5_vl_pipe, video_seeds):
    seeds = [data for _, data in video_seeds]
    strategy = st.tuples(st.integers(0, 2), mutations(seeds), video_options)
    ci, _ = fuzz(strategy, 25)(_video_property(qwen2_5_vl_pipe, video_seeds))
    ci()


@deep
def test_video_containers_slow(qwen2_5_vl_pipe, video_seeds):
    seeds = [data for _, data in video_seeds]
    strategy = st.tuples(st.integers(0, 2), mutations(seeds), video_options)
    _, slow = fuzz(strategy, 25)(_video_property(qwen2_5_vl_pipe, video_seeds))
    slow()


def _message_property(pipe):
    def check(conversation) -> None:
        result = outcome(lambda: pipe.prepare(pipe._as_batch(conversation)[0]))
        assert isinstance(result, (tuple, InputError)), type(result)

    return check


def test_message_structures(qwen2_5_vl_pipe):
    fuzz(conversations, 150)(_message_property(qwen2_5_vl_pipe))[0]()


@deep
def test_message_structures_slow(qwen2_5_vl_pipe):
    fuzz(conversations, 150)(_message_property(qwen2_5_vl_pipe))[1]()


def _settings_property(pipe):
    from vlm_export.runtime.sampling import TokenSelector

    vocab = int(pipe.manifest.text["vocab_size"])
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, vocab)) * 30).astype(np.float32)
    logits[1, :10] = 1e4  # extreme but finite logits
    prompt = np.array([[1, 2, 3], [4, 5, 6]])

    def check(overrides) -> None:
        settings_or_error = outcome(lambda: pipe.settings(**overrides))
        if isinstance(settings_or_error, InputError):
            return
        tokens = TokenSelector(settings_or_error).select(logits, prompt, np.ones_like(prompt))
        assert tokens.shape == (2,) and ((tokens >= 0) & (tokens < vocab)).all()

    return check


def test_sampling_settings(qwen2_5_vl_pipe):
    fuzz(sampling_settings, 150)(_settings_property(qwen2_5_vl_pipe))[0]()


@deep
def test_sampling_settings_slow(qwen2_5_vl_pipe):
    fuzz(sampling_settings, 150)(_settings_property(qwen2_5_vl_pipe))[1]()


def _manifest_mutations(base: dict) -> st.SearchStrategy[dict]:
    """The export's manifest with values replaced, keys deleted or added at random depths."""

    @st.composite
    def mutate(draw) -> dict:
        data = copy.deepcopy(base)
        for _ in range(draw(st.integers(1, 4))):
            target, path = data, []
            while isinstance(target, dict | list) and target and draw(st.booleans()):
                key = draw(st.sampled_from(sorted(target) if isinstance(target, dict) else range(len(target))))
                path.append(key)
                parent, target = target, target[key]
            if not path:
                data[draw(st.text(max_size=6))] = draw(json_values)
                continue
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = draw(json_values)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=6))] = draw(json_values)
        return data

    return mutate()


def test_manifest_fields(exported_qwen2_5_vl):
    from vlm_export.manifest import Manifest

    base = json.loads((exported_qwen2_5_vl / "manifest.json").read_text())

    def check(data) -> None:
        result = outcome(lambda: Manifest.from_dict(data))
        assert isinstance(result, (Manifest, ManifestError)), type(result)

    ci, _ = fuzz(st.one_of(_manifest_mutations(base), json_values), 200)(check)
    ci()


@pytest.fixture(scope="module")
def manifest_folder(exported_qwen2_5_vl, tmp_path_factory) -> Path:
    """A copy of the export whose manifest.json the pipeline property rewrites."""
    import shutil

    folder = tmp_path_factory.mktemp("fuzz") / "export"
    shutil.copytree(exported_qwen2_5_vl, folder)
    return folder


def _pipeline_property(folder: Path, base: dict):
    from vlm_export.runtime import VLMPipeline

    def check(data) -> None:
        (folder / "manifest.json").unlink()
        (folder / "manifest.json").write_text(json.dumps(data))

        def build_and_run():
            pipe = VLMPipeline.from_pretrained(folder)
            return pipe.generate([{"role": "user", "content": "hi"}], max_new_tokens=2, do_sample=False)

        result = outcome(build_and_run)
        assert not isinstance(result, BaseException) or isinstance(result, ALLOWED), type(result)

    return check


def _light_mutations(base: dict) -> st.SearchStrategy[dict]:
    """Mutations of the sections a pipeline reads on load (graphs kept: loading them dominates the cost)."""
    graphs = base["graphs"]
    return _manifest_mutations({k: v for k, v in base.items() if k != "graphs"}).map(lambda d: {**d, "graphs": graphs})


def test_manifest_fields_through_the_pipeline(manifest_folder):
    base = json.loads((manifest_folder / "manifest.json").read_text())
    fuzz(_light_mutations(base), 25)(_pipeline_property(manifest_folder, base))[0]()


@deep
def test_manifest_fields_through_the_pipeline_slow(manifest_folder):
    base = json.loads((manifest_folder / "manifest.json").read_text())
    fuzz(_light_mutations(base), 25)(_pipeline_property(manifest_folder, base))[1]()


# -- chat templates -----------------------------------------------------------------------------------------------

_FILTERS_WITH_NUMBER = ("center", "indent", "batch", "wordwrap", "truncate", "slice")
_FILTERS = (*_FILTERS_WITH_NUMBER, "join", "list", "length", "tojson", "string", "sum", "upper", "unique")
_NUMBERS = st.one_of(st.integers(-3, 40), st.sampled_from([10**5, 10**6, 10**9, 2**62]))
_EXPRESSIONS = st.recursive(
    st.one_of(
        _NUMBERS.map(str),
        st.sampled_from(["'ab'", "messages", "messages[0]", "ns.v", "loop.index", "x", "none", "[1, 2]", "{'a': 1}"]),
    ),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["~", "+", "*", "**", "%", "//"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        st.tuples(inner, st.sampled_from(_FILTERS), _NUMBERS).map(
            lambda t: f"({t[0]}|{t[1]}({t[2]}))" if t[1] in _FILTERS_WITH_NUMBER else f"({t[0]}|{t[1]})"
        ),
        st.tuples(inner, st.sampled_from(["ljust", "zfill", "center"]), _NUMBERS).map(
            lambda t: f"{t[0]}.{t[1]}({t[2]})"
        ),
        inner.map(lambda e: f"range({e})"),
    ),
    max_leaves=6,
)
_STATEMENTS = st.recursive(
    st.one_of(
        _EXPRESSIONS.map(lambda e: "{{ " + e + " }}"),
        _EXPRESSIONS.map(lambda e: "{% set ns.v = " + e + " %}"),
        _EXPRESSIONS.map(lambda e: "{% set x = " + e + " %}"),
        st.sampled_from(["text", "{{ m(1) }}", "{% include 'a' %}", "{{ raise_exception('no') }}", "{% if x %}"]),
    ),
    lambda inner: st.one_of(
        st.tuples(_EXPRESSIONS, st.lists(inner, max_size=3)).map(
            lambda t: "{% for x in " + t[0] + " %}" + "".join(t[1]) + "{% endfor %}"
        ),
        st.lists(inner, max_size=3).map(lambda body: "{% macro m(n) %}" + "".join(body) + "{{ m(n) }}{% endmacro %}"),
        st.lists(inner, max_size=3).map("".join),
    ),
    max_leaves=8,
)
templates = _STATEMENTS.map(lambda body: "{% set ns = namespace(v=1) %}{% set x = 2 %}" + body)


def _template_case(template: str) -> None:
    from vlm_export.runtime import chat
    from vlm_export.runtime.template_sandbox import RenderLimits

    saved = chat.DEFAULT_LIMITS
    chat.DEFAULT_LIMITS = RenderLimits(seconds=5.0, steps=200_000, value_chars=1 << 20, output_chars=4 << 20)
    try:
        result = outcome(lambda: chat.render_chat(template, [{"role": "user", "content": "hi"}]))
    finally:
        chat.DEFAULT_LIMITS = saved
    assert isinstance(result, (str, InputError, ManifestError)), type(result)


test_chat_templates, test_chat_templates_slow = fuzz(templates, 150)(_template_case)

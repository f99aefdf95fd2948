"""`vlm-run`: generate text from an exported folder with images, videos and a prompt (no torch needed)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vlm_export.errors import InputError, VLMExportError

DEFAULT_MAX_NEW_TOKENS = 256
MAX_PROMPT_BYTES = 64 << 20
EPILOG = """\
examples:
  vlm-run out/qwen25vl --image cat.jpg --prompt "Describe it."
  vlm-run out/qwen25vl --image a.png --image b.png --prompt "Compare them." --max-new-tokens 64 --greedy
  vlm-run out/qwen25vl --video clip.mp4 --fps 1 --prompt "What happens in this video?"
  vlm-run out/qwen3vl --image a.png --video clip.mp4 --num-frames 8 --prompt "Is the picture in the video?"
  vlm-run out/qwen25vl --prompt "Hello" --json
  vlm-run out/qwen25vl --image page.png --prompt-file question.txt
  vlm-run verify out/qwen25vl --backend ort-cpu     # check the export against its golden cases (see --help there)

Images come before videos in the message, then the prompt. Without --fps/--num-frames videos are sampled as the
model's video processor does by default (Qwen2.5-VL: every frame; Qwen3-VL: 2 fps).
Sampling defaults come from the model's generation_config.json, as in transformers; --greedy turns sampling off.
"""


def build_parser() -> argparse.ArgumentParser:
    from vlm_export.runtime.backends import BACKEND_HELP, BACKENDS

    parser = argparse.ArgumentParser(
        prog="vlm-run",
        description="Generate text with a model exported by vlm-export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="folder written by vlm-export")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="user message text")
    prompt.add_argument(
        "--prompt-file",
        type=Path,
        metavar="PATH",
        help="read the user message from a UTF-8 text file ('-' = stdin; one final newline is dropped), for prompts "
        "too long for the command line",
    )
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--video", action="append", default=[], help="video file (repeat for several)")
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--fps", type=float, help="sample the videos at this many frames per second")
    frames.add_argument("--num-frames", type=int, help="sample this many frames from each video")
    parser.add_argument("--system", help="system message (default: the chat template's own)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"tokens to generate (default: generation_config's max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument("--temperature", type=float, help="sampling temperature (implies sampling)")
    parser.add_argument("--top-k", type=int, help="top-k sampling cut-off")
    parser.add_argument("--top-p", type=float, help="nucleus sampling cut-off")
    parser.add_argument("--repetition-penalty", type=float, help="repetition penalty (1.0 = off)")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample=False)")
    parser.add_argument("--backend", choices=BACKENDS, default="ort-cpu", help=f"inference backend: {BACKEND_HELP}")
    parser.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, timings")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def _prompt_text(args: argparse.Namespace) -> str:
    """The user message: --prompt as given (checked for undecodable bytes), or --prompt-file's UTF-8 text."""
    if args.prompt is not None:
        _check_utf8(args.prompt, "--prompt")
        return args.prompt
    path = args.prompt_file
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        else:
            with open(path, "rb") as file:  # a pipe (`<(command)`) is fine here: it is read to its end
                data = file.read(MAX_PROMPT_BYTES + 1)
    except OSError as error:
        raise InputError(f"cannot read --prompt-file {str(path)!r}: {error.strerror or error}") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise InputError(f"--prompt-file {str(path)!r} is larger than {MAX_PROMPT_BYTES >> 20} MiB; no model takes it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(
            f"--prompt-file {str(path)!r} is not UTF-8 text (byte {error.start}); convert it, e.g. with iconv"
        ) from None
    return text[:-1] if text.endswith("\n") else text


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # bytes that are not UTF-8 arrive as lone surrogates (surrogateescape)
        raise InputError(
            f"{what} is not valid UTF-8 (undecodable byte at character {error.start}); pass UTF-8 text, or put "
            "the prompt in a file and use --prompt-file"
        ) from None


def _messages(args: argparse.Namespace, prompt: str) -> list[dict]:
    content: list[dict] = [{"type": "image", "path": path} for path in args.image]
    sampling = {key: value for key, value in (("fps", args.fps), ("num_frames", args.num_frames)) if value is not None}
    content += [{"type": "video", "path": path, **sampling} for path in args.video]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": content})
    return messages


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:  # subcommand; an export folder named "verify" runs as ./verify
        from vlm_export.verification.run_cli import main as verify_main

        return verify_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.fps is not None or args.num_frames is not None) and not args.video:
        parser.error("--fps / --num-frames apply to videos; pass --video FILE")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from vlm_export.runtime.pipeline import VLMPipeline

    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    if args.greedy:
        settings["do_sample"] = False
    elif args.temperature is not None:
        settings["do_sample"] = True
    try:
        prompt = _prompt_text(args)
        if args.system is not None:
            _check_utf8(args.system, "--system")
        pipe = VLMPipeline.from_pretrained(args.model, backend=args.backend)
        if settings["max_new_tokens"] is None and "max_new_tokens" not in pipe.generation_config:
            settings["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        messages = _messages(args, prompt)
        if args.json:
            result = pipe.generate(messages, **settings)
            print(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            for piece in pipe.stream(messages, **settings):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except VLMExportError as error:
        print(f"vlm-run: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`vlm-run ... | head`): stop quietly, as command-line tools do on SIGPIPE; stdout
        # now points at /dev/null so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())

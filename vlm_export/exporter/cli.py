"""`vlm-export`: split a Hugging Face VLM into vision / embedding / decoder ONNX graphs plus a manifest."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from vlm_export.errors import VLMExportError

EPILOG = """\
examples:
  vlm-export --model Qwen/Qwen2.5-VL-3B-Instruct --output out/qwen25vl
  vlm-export --model ./my-local-model --output out/m --dtype float16 --overwrite
  vlm-run out/qwen25vl --image cat.jpg --prompt "Describe it."

The output folder holds vision_encoder.onnx, embedding.onnx, decoder.onnx, manifest.json (the contract the
runtime reads), tokenizer.json, chat_template.jinja and the processor/generation configs. Each graph is run in
ONNX Runtime against transformers after export; a difference above tolerance fails the export.
"""


def build_parser() -> argparse.ArgumentParser:
    from vlm_export.graphs.registry import supported_model_types

    parser = argparse.ArgumentParser(
        prog="vlm-export",
        description="Export a Hugging Face vision-language model to ONNX graphs runnable without torch "
        f"(supported model types: {', '.join(supported_model_types())}).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="hub id (owner/name) or local model folder")
    parser.add_argument("--output", required=True, type=Path, help="folder to create")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="weight/activation type of the graphs (default float32, exact on CPU)",
    )
    parser.add_argument("--max-batch", type=int, help="largest batch the runtime accepts (default: unbounded)")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        help="longest prompt + generated tokens (default: the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        help="pixel budget per image; larger images are resized to fit (default: the processor's max_pixels)",
    )
    parser.add_argument(
        "--moe-form",
        choices=["ort_moe", "dense", "batched_mm"],
        help="how mixture-of-experts layers are exported (MoE models only; default ort_moe): ort_moe = ONNX "
        "Runtime's fused MoE kernel (fastest on ONNX Runtime, not TensorRT); dense = every expert on every token "
        "with plain ONNX ops (TensorRT-parsable); batched_mm = gathered expert weights (short inputs only)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--allow-untested-transformers",
        action="store_true",
        help="export with a transformers version the parity tests do not cover",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--verbose", action="store_true", help="debug logging (includes torch exporter output)")
    return parser


def _summary(result) -> str:
    manifest = result.manifest
    lines = [f"exported {manifest.family} ({manifest.dtype}) to {result.output}"]
    lines.append(f"  {'graph':<16}{'size':>12}{'max |diff| vs transformers':>30}{'export s':>10}")
    for name, graph in manifest.graphs.items():
        path = result.output / graph.file
        size = path.stat().st_size + sum(p.stat().st_size for p in result.output.glob(graph.file + ".data"))
        export_s = result.seconds.get(f"export {name}", 0.0)
        lines.append(f"  {name:<16}{size / 1e6:>10.1f}MB{graph.max_abs_diff:>30.3g}{export_s:>10.1f}")
    lines.append(f'run it: vlm-run {result.output} --prompt "..." [--image PATH]')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if not args.verbose:  # "torchvision is not installed. Skipping torchvision::nms" and similar
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    from vlm_export.exporter.export import export_model

    start = time.perf_counter()
    try:
        result = export_model(
            args.model,
            args.output,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            max_image_pixels=args.max_image_pixels,
            revision=args.revision,
            allow_untested_transformers=args.allow_untested_transformers,
            progress=not args.quiet,
            moe_form=args.moe_form,
        )
    except VLMExportError as error:
        print(f"vlm-export: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vlm-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(_summary(result))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

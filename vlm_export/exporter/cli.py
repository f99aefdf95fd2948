"""`vlm-export`: split a Hugging Face VLM into vision / embedding / decoder ONNX graphs plus a manifest."""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

from vlm_export.errors import VLMExportError
from vlm_export.exporter.interrupts import Interrupted, signals_interrupt

EPILOG = """\
examples:
  vlm-export --model Qwen/Qwen2.5-VL-3B-Instruct --output out/qwen25vl
  vlm-export --model ./my-local-model --output out/m --dtype float16 --overwrite
  vlm-run out/qwen25vl --image cat.jpg --prompt "Describe it."
  vlm-export --model Qwen/Qwen2.5-VL-7B-Instruct --output out/q7 --engine trt --dtype float16 --max-batch 2
  vlm-export build-engines out/q7      # (re)build TensorRT engines on the target machine; see --help there
  vlm-export verify out/q7             # compare the export with transformers stage by stage; see --help there
  vlm-run verify out/q7 --backend trt  # on the device, no torch: compare with the golden cases in the export

The output folder holds vision_encoder.onnx, embedding.onnx, decoder.onnx, manifest.json (the contract the
runtime reads), tokenizer.json, chat_template.jinja and the processor/generation configs. Each graph is run in
ONNX Runtime against transformers after export; a difference above tolerance fails the export.
"""


#: The exporter (torch, transformers) needs Python 3.11+; the runtime and `vlm-export build-engines` run on 3.10.
EXPORTER_PYTHON = (3, 11)


def python_too_old() -> str:
    return (
        f"error: vlm-export needs Python {'.'.join(map(str, EXPORTER_PYTHON))}+ to export (this is Python "
        f"{platform.python_version()}); the runtime (vlm-run) and `vlm-export build-engines` work on 3.10: export on "
        "a machine with Python 3.11+ and copy the output folder here"
    )


def build_parser() -> argparse.ArgumentParser:
    from vlm_export.exporter.quantize import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, DEFAULT_GRAPHS
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
    parser.add_argument(
        "--engine",
        choices=["trt"],
        help="also build TensorRT engines on this machine after the export (needs tensorrt + polygraphy; "
        "`vlm-export build-engines DIR` does the same later, e.g. on a Jetson)",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        help="with --engine trt: images per request over the whole batch the vision engine accepts (default 4)",
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "int4", "int8"],
        default="none",
        help="weight-only block-wise quantization for CPU after the float32 export is verified (default none): "
        "int4/int8 weights in ONNX Runtime's MatMulNBits (and GatherBlockQuantized for the int4 embedding "
        "table), float32 activations; not exact, so the teacher-forced top-1 agreement with float32 is measured "
        "and reported instead",
    )
    parser.add_argument(
        "--quant-block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"weights per scale/zero point, a power of two >= 16 (default {DEFAULT_BLOCK_SIZE}, as llama.cpp's "
        "q4_0; 128 decodes ~15%% and pre-fills ~35%% faster with a clearly larger rounding error)",
    )
    parser.add_argument(
        "--quant-accuracy-level",
        type=int,
        choices=range(5),
        default=DEFAULT_ACCURACY_LEVEL,
        metavar="{0,1,2,3,4}",
        help=f"MatMulNBits compute type (default {DEFAULT_ACCURACY_LEVEL}): 4 = int8 dot products on "
        "block-quantized activations (fastest on x86/ARM CPUs), 1 = float32 (dequantize weights first; more "
        "exact, so try it when the reported agreement is poor), 0 = unset (kernel's choice)",
    )
    parser.add_argument(
        "--quant-graphs",
        default=",".join(DEFAULT_GRAPHS),
        help=f"comma-separated graphs to quantize (default {','.join(DEFAULT_GRAPHS)}); adding vision_encoder "
        "quantizes it to int8 weights and activations whatever the scheme (~2.5x faster ViT, ~4%% error; README)",
    )
    parser.add_argument(
        "--verify",
        choices=["auto", "full", "reduced"],
        default="auto",
        help="how the graphs are checked against transformers (default auto): full = every graph against the whole "
        "model's forward (needs ~2.3x the float32 parameters in memory); reduced = the same graph code with the "
        "model's own weights on a copy that keeps a few layers (what fits a 7B model on a 24 GB machine); auto = "
        "full when it fits. The manifest records what was verified",
    )
    golden = parser.add_mutually_exclusive_group()
    golden.add_argument(
        "--golden",
        action="store_true",
        help="store golden cases even when transformers' float32 model does not fit in memory: it then runs one "
        "module's weights at a time, reading every weight again for each generated token (7B on a 2-core 24 GB "
        "machine: ~30 s per token, ~40 minutes for the five cases)",
    )
    golden.add_argument(
        "--no-golden",
        action="store_true",
        help="do not store golden cases. By default the export carries them (transformers' float32 outputs on inputs "
        "the exporter makes, a few hundred KB; `vlm-run verify DIR` checks the export against them on any backend) "
        "when transformers' model fits in memory, and says how to add them later (`vlm-export verify "
        "--write-golden DIR`) when it does not",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it is an earlier export (and holds nothing else)"
    )
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
    quant = manifest.quantization
    if quant:
        agreement = quant.get("agreement_vs_float32", {})
        lines.append(
            f"  quantized {quant['scheme']} (block {quant['block_size']}, accuracy level {quant['accuracy_level']}): "
            f"{', '.join(quant['graphs'])}; diffs above are of the float32 graphs before quantization"
        )
        if agreement:
            lines.append(
                f"  teacher-forced agreement with float32: top-1 {agreement['top1']:.3f}, "
                f"top-5 {agreement['top5']:.3f} over {agreement['positions']} tokens"
            )
    verification = manifest.verification
    if verification.get("depth") == "reduced":
        kept = "; ".join(f"{label} {layers}" for label, layers in verification.get("kept", {}).items())
        lines.append(f"  verified on a depth-reduced copy with the model's weights ({kept}): diffs above are its own")
    if manifest.golden:
        cases = len(manifest.golden.get("cases", []))
        lines.append(f"  {cases} golden cases stored: check the export on any backend: vlm-run verify {result.output}")
    else:
        lines.append(f"  no golden cases: add them with vlm-export verify --write-golden {result.output}")
    lines.append(f'run it: vlm-run {result.output} --prompt "..." [--image PATH] [--video PATH]')
    return "\n".join(lines)


def _quantize_config(args: argparse.Namespace):
    from vlm_export.exporter.quantize import QuantizeConfig

    if args.quantize == "none":
        return None
    graphs = tuple(g.strip() for g in args.quant_graphs.split(",") if g.strip())
    return QuantizeConfig(
        scheme=args.quantize,
        block_size=args.quant_block_size,
        accuracy_level=args.quant_accuracy_level,
        graphs=graphs,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build-engines"]:  # torch-free subcommand: runs where only the runtime + TensorRT exist
        from vlm_export.exporter.engines import main as build_engines_main

        return build_engines_main(argv[1:])
    if sys.version_info < EXPORTER_PYTHON:
        print(python_too_old(), file=sys.stderr)
        return 2
    if argv[:1] == ["verify"]:  # compare an export with transformers, stage by stage
        from vlm_export.verification.export_cli import main as verify_main

        return verify_main(argv[1:])
    with signals_interrupt():
        try:
            return _run(argv)
        except Interrupted as interrupted:
            print(f"vlm-export: interrupted ({interrupted}); nothing was written", file=sys.stderr)
            return interrupted.exit_code
        except KeyboardInterrupt:
            print("vlm-export: interrupted; nothing was written", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `vlm-export ... | head`: the reader went away; say nothing more
            sys.stderr.close()
            return 1


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if not args.verbose:  # "torchvision is not installed. Skipping torchvision::nms" and similar
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    start = time.perf_counter()
    try:
        from vlm_export.exporter.export import export_model

        if args.engine == "trt":  # fail before a long export, not after it
            from vlm_export.exporter.engines import require_tensorrt

            if args.quantize != "none":
                raise VLMExportError("--quantize targets ONNX Runtime; TensorRT engines need an unquantized export")
            require_tensorrt()
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
            quantize=_quantize_config(args),
            verify=args.verify,
            golden="always" if args.golden else "never" if args.no_golden else "auto",
        )
        engines = None
        if args.engine == "trt":
            from vlm_export.exporter.engines import build_engines

            try:
                engines = build_engines(
                    result.output,
                    max_batch=args.max_batch,
                    max_seq_len=args.max_seq_len,
                    max_image_pixels=args.max_image_pixels,
                    max_images=args.max_images,
                    progress=not args.quiet,
                )
            except VLMExportError as error:
                raise VLMExportError(
                    f"{error} (the ONNX export in {result.output} is complete; build the engines again with "
                    f"`vlm-export build-engines {result.output}`)"
                ) from None
    except VLMExportError as error:
        print(f"vlm-export: error: {error}", file=sys.stderr)
        return 1
    print(_summary(result))
    if engines is not None:
        from vlm_export.exporter.engines import summary

        print(summary(engines, result.output))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

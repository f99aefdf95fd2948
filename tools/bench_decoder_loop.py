#!/usr/bin/env python
"""Time decoder graphs alone, each in the same Python IO-binding loop: ours, or onnxruntime-genai's.

    python tools/bench_decoder_loop.py /tmp/bench/m05-int4/decoder.onnx \
        /tmp/bench/m05-peers/ortgenai-int4/model.onnx --rounds 6 --threads 2

`tools/bench_peers.py` times whole generation loops: ours in Python around two graphs (embedding + decoder),
onnxruntime-genai's in C++ around one. This tool takes the loop out of the comparison: every graph gets the same
driver (one IO binding per step, each KV cache buffer bound as both `past` input and `present` output, so ONNX
Runtime updates it in place), a --prompt-tokens prefill, then --steps single-token steps, on random inputs (the
graph's speed does not depend on the values). Each graph runs in its own process per round, interleaved
round by round, so all share each window of a machine whose speed drifts.

Feeds come from the graph's declared inputs: `inputs_embeds` (ours) or `input_ids` (onnxruntime-genai's),
`position_ids` ([3, B, S] for MRoPE or [B, S]), `attention_mask`, the cache (`past_key_values.*`: head size
from the static shape, or from onnxruntime-genai's `genai_config.json` beside the graph), and zeros for
anything else (Qwen3-VL's DeepStack inputs with no visual tokens).

Reported per graph: median over rounds of the median step time (ms), of the mean step time (what a tokens/s
figure measures: it includes the occasional slow step), and of the prefill time. onnxruntime-genai's graphs
return logits for every prompt position (ours only for the last), so their prefill times are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _head_size(graph: Path) -> int | None:
    config = graph.parent / "genai_config.json"
    if config.exists():
        return int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
    return None


class DecoderLoop:
    """One decoder session driven step by step with an in-place cache of --capacity positions."""

    def __init__(self, graph: Path, threads: int, batch: int, capacity: int, seed: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.ort = ort
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.batch, self.capacity = batch, capacity
        self.rng = np.random.default_rng(seed)
        head_size = _head_size(graph)
        self.cache: dict[str, Any] = {}
        for name, info in self.inputs.items():
            if not name.startswith("past_key_values."):
                continue
            dims = list(info.shape)
            if not isinstance(dims[3], int):
                if head_size is None:
                    raise SystemExit(f"error: {graph}: {name} has no static head size and no genai_config.json")
                dims[3] = head_size
            shape = (batch, dims[1], capacity, dims[3])
            self.cache[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, _NUMPY[info.type]))
        self.hidden = self.inputs["inputs_embeds"].shape[2] if "inputs_embeds" in self.inputs else None
        self.total = 0

    def _feeds(self, length: int) -> dict[str, np.ndarray]:
        batch, past = self.batch, self.total
        feeds: dict[str, np.ndarray] = {}
        for name, info in self.inputs.items():
            if name in self.cache:
                continue
            if name == "inputs_embeds":
                value = (self.rng.standard_normal((batch, length, self.hidden)) * 0.02).astype(_NUMPY[info.type])
            elif name == "input_ids":
                value = self.rng.integers(0, 1000, (batch, length)).astype(_NUMPY[info.type])
            elif name == "position_ids":
                positions = np.broadcast_to(np.arange(past, past + length), (batch, length))
                value = np.broadcast_to(positions, (3, batch, length)) if len(info.shape) == 3 else positions
                value = np.ascontiguousarray(value, dtype=_NUMPY[info.type])
            elif name == "attention_mask":
                value = np.ones((batch, past + length), dtype=_NUMPY[info.type])
            else:
                sizes = {"batch": batch, "batch_size": batch, "sequence": length, "sequence_length": length}
                shape = [d if isinstance(d, int) else sizes.get(d, 0) for d in info.shape]
                value = np.zeros(shape, dtype=_NUMPY[info.type])
            feeds[name] = value
        return feeds

    def step(self, length: int = 1) -> np.ndarray:
        """Feed `length` new positions per row; returns the logits as the graph gives them."""
        binding = self.session.io_binding()
        for name, value in self._feeds(length).items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")
        for name, buffer in self.cache.items():
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present", 1), buffer)
        self.session.run_with_iobinding(binding)
        self.total += length
        return binding.get_outputs()[0].numpy()


def child(graph: Path, args: argparse.Namespace) -> dict[str, float]:
    def run() -> tuple[float, list[float]]:
        loop = DecoderLoop(graph, args.threads, args.batch, args.prompt_tokens + args.steps)
        start = time.perf_counter()
        loop.step(args.prompt_tokens)
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loop.step()
            steps.append(time.perf_counter() - start)
        return prefill, steps

    run()  # warm-up
    prefill, steps = run()
    return {
        "step_ms_median": 1e3 * statistics.median(steps),
        "step_ms_mean": 1e3 * statistics.fmean(steps),
        "prefill_ms": 1e3 * prefill,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graphs", nargs="+", type=Path, help="decoder .onnx files (ours or onnxruntime-genai's)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=128, help="single-token steps after the prefill")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, one process per graph each")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    missing = [str(g) for g in args.graphs if not g.is_file()]
    if missing:
        parser.error(f"no such graph: {', '.join(missing)}")
    if args.child:
        print(json.dumps(child(args.graphs[0], args)))
        return 0
    rounds: dict[str, list[dict[str, float]]] = {str(g): [] for g in args.graphs}
    passed = [
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--child",
    ]
    for index in range(args.rounds):
        for graph in args.graphs:
            done = subprocess.run(
                [sys.executable, __file__, str(graph), *passed],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                raise SystemExit(f"error: timing {graph} failed (exit {done.returncode}); its error is above")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            rounds[str(graph)].append(figures)
            print(
                f"round {index + 1}: {graph}: step {figures['step_ms_median']:.2f} ms median, "
                f"{figures['step_ms_mean']:.2f} mean; prefill {figures['prefill_ms']:.1f} ms",
                flush=True,
            )
    print(
        f"\nbatch {args.batch}, {args.prompt_tokens}-token prefill, {args.steps} steps, {args.threads} threads, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(f"{'step ms median':>15} {'step ms mean':>13} {'prefill ms':>11}  graph")
    for graph, runs in rounds.items():
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"{med['step_ms_median']:15.2f} {med['step_ms_mean']:13.2f} {med['prefill_ms']:11.1f}  {graph}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Serving benchmark: `vlm-serve` beside llama.cpp's OpenAI server on the same checkpoint, through HTTP.

    python tools/make_model.py --preset qwen2_5_vl-0.5b --output /tmp/bench/m05
    vlm-export --model /tmp/bench/m05 --output /tmp/bench/m05-onnx
    python tools/bench_serve.py /tmp/bench/m05-onnx --checkpoint /tmp/bench/m05 --work /tmp/bench/m05-peers \
        --clients 1,4,8,16 --new-tokens 32 --rounds 2 --threads 2 --json serve.json
    python tools/bench_serve.py --show --json serve.json        # print a saved report again

Both servers run as child processes with --threads threads each and are driven by the same client code
(`openai.AsyncOpenAI`, streamed, greedy `temperature=0`, `max_tokens=--new-tokens`, text prompts from a fixed list
of --clients-max distinct questions, so rows of different lengths share a batch). llama.cpp's side is
`python -m llama_cpp.server` (llama-cpp-python's [server] extra, the `bench` extra here) on the text part of
--checkpoint converted to GGUF f32 exactly as tools/bench_peers.py does it (the same cache under --work); ours is
`vlm-serve` on the vlm-export folder of that checkpoint with --max-batch = the largest --clients. Without
--checkpoint (or without llama_cpp installed) only ours runs.

Measured per wave (N clients each send one request at the same moment), median over --rounds rounds; each wave
size runs on the two servers back to back (ours first in odd rounds, llama.cpp first in even ones), so a busy spell
on a shared machine hits both sides of a pair:
  tok/s        completion tokens of the wave / wall time from the first request sent to the last token received
  TTFT p50/p95 request sent -> first content chunk, over the wave's requests
  ITL p50      per request (time of last chunk - time of first chunk) / (completion tokens - 1): the inter-token
               latency a client sees
  busy         the server process's CPU seconds / wall seconds over the wave (/proc): well below --threads means
               another process took the cores
  tok/CPU-s    tokens / the server's CPU seconds: what it made of the cores it got, steadier than tok/s when
               neighbours take the cores (a server that spins while waiting scores lower)
Target (issue 19): ours with 8 concurrent greedy requests >= 2x the token throughput of the same 8 sent one after
another (the "seq8" wave), and each concurrent answer identical to its sequential one (`same`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))  # run from a source checkout without installing the package
sys.path.insert(0, str(TOOLS))

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "List some facts about the moon.",
    "Describe a busy market in the morning, with its sounds and smells.",
    "What is the capital of France?",
    "Give advice to someone learning to play the violin at the age of forty.",
    "Summarise the plot of a detective novel.",
    "Why is the sky blue?",
    "Write a poem about rain on a tin roof.",
    "How do bees make honey?",
    "Compare trains and planes for a trip of five hundred kilometres.",
    "Tell me about the history of paper.",
    "What should I cook tonight?",
    "Describe the rules of chess briefly.",
    "Explain recursion to a child.",
    "Plan a weekend in the mountains for a family with two small children and a dog.",
]


class Server:
    """A server child process on a loopback port, with its log and CPU clock."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, log: Path, model: str, env=None):
        self.name, self.port, self.ready_path, self.model = name, port, ready_path, model
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.process = subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.process.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} not ready after {timeout:.0f} s; see {self.log}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def one_request(client, model: str, question: str, new_tokens: int) -> dict[str, Any]:
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        # an explicit system message: the two servers' chat templates then differ at most in their markup
        messages=[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}],
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    times, pieces, tokens, prompt = [], [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            tokens, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            pieces.append(chunk.choices[0].delta.content)
    tokens = tokens if tokens is not None else len(times)
    itl = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None
    ttft = times[0] - sent if times else None
    end = times[-1] if times else sent
    return {"text": "".join(pieces), "tokens": tokens, "prompt": prompt, "ttft": ttft, "itl": itl, "end": end}


async def wave(server: Server, questions: list[str], new_tokens: int, sequential: bool) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=3600)
    cpu0, start = server.cpu_seconds(), time.perf_counter()
    if sequential:
        results = [await one_request(client, server.model, q, new_tokens) for q in questions]
    else:
        results = await asyncio.gather(*(one_request(client, server.model, q, new_tokens) for q in questions))
    wall = max(r["end"] for r in results) - start
    busy = (server.cpu_seconds() - cpu0) / wall
    await client.close()
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    itls = [r["itl"] for r in results if r["itl"] is not None]
    return {
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "itl_p50": statistics.median(itls) if itls else None,
        "busy": busy,
        "tokens": [r["tokens"] for r in results],
        "prompt_tokens": [r["prompt"] for r in results],
        "empty": sum(r["tokens"] == 0 for r in results),  # answered with no token: a server that dropped requests
        "texts": [r["text"] for r in results],
    }


def start_ours(args: argparse.Namespace, port: int) -> Server:
    command = [sys.executable, "-m", "vlm_export.serve.cli", str(args.export), "--port", str(port)]
    command += ["--max-batch", str(max(args.clients)), "--served-model-name", "ours", "--log-level", "warning"]
    env = {"VLM_EXPORT_THREADS": str(args.threads), "PYTHONPATH": str(TOOLS.parent)}
    return Server("vlm-serve", command, port, "/health", args.work / "logs" / "vlm-serve.log", "ours", env)


def start_llama(args: argparse.Namespace, port: int) -> Server | None:
    if args.checkpoint is None:
        return None
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as error:
        print(f"llama.cpp's server is not installed ({error}); pip install -e .[bench]; measuring ours only")
        return None
    import bench_peers

    src = bench_peers.llama_cpp_source(args.work, args.llama_cpp_src)
    gguf = bench_peers.convert_llama(args.checkpoint, args.work, "fp32", src, args.threads)
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    # interrupt_requests defaults to True: a new request would cut the one being answered (0 tokens for the others)
    command += ["--n_ctx", "4096", "--model_alias", "llama", "--interrupt_requests", "False"]
    return Server("llama.cpp", command, port, "/v1/models", args.work / "logs" / "llama-server.log", "llama")


def cpu_model() -> str:
    import bench_peers

    return bench_peers.cpu_model()


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    table = {}
    for side, waves in raw.items():
        table[side] = {}
        for name, rounds in waves.items():
            row = {k: median_of(rounds, k) for k in ("tok_s", "ttft_p50", "ttft_p95", "itl_p50", "busy")}
            # tokens per CPU-second of the server: what a wave made of the cores it got (robust to neighbours)
            # (a wave too short for the CPU clock to see has busy 0 and no such figure)
            per_cpu = [r["tok_s"] / r["busy"] for r in rounds if r["busy"]]
            row["tok_cpu_s"] = statistics.median(per_cpu) if per_cpu else None
            table[side][name] = row
    ours = raw.get("ours", {})
    target = None
    if "8" in ours and "seq8" in ours:
        ratios = [c["tok_s"] / s["tok_s"] for c, s in zip(ours["8"], ours["seq8"], strict=True)]
        pairs = zip(ours["8"], ours["seq8"], strict=True)
        same = [sum(a == b for a, b in zip(c["texts"], s["texts"], strict=True)) for c, s in pairs]
        target = {"ratio_per_round": ratios, "ratio": statistics.median(ratios), "identical_per_round": same}
    versus = {}
    for name, rounds in ours.items():
        theirs = raw.get("llama", {}).get(name)
        if theirs:
            versus[name] = statistics.median(o["tok_s"] / t["tok_s"] for o, t in zip(rounds, theirs, strict=True))
    return {"table": table, "target": target, "ours_over_llama": versus}


def print_report(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print(f"\n{meta['when']} | {meta['cpu']} | {meta['threads']} threads per server | {meta['new_tokens']} new tokens")
    header = f"{'server':<10} {'clients':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>9} {'busy':>6}"
    print(header + f" {'tok/CPU-s':>10}")
    table = report["summary"]["table"]

    def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    for side, waves in table.items():
        for name, row in waves.items():
            print(
                f"{side:<10} {name:>8} {fmt(row['tok_s'], digits=1):>8} {fmt(row['ttft_p50']):>8}s "
                f"{fmt(row['ttft_p95']):>8}s {fmt(row['itl_p50'], 1000, 0):>7}ms {fmt(row['busy']):>6} "
                f"{fmt(row.get('tok_cpu_s'), digits=1):>10}"
            )
    versus = report["summary"].get("ours_over_llama")
    if versus:
        pairs = ", ".join(f"{n} clients {r:.2f}x" for n, r in versus.items())
        print(f"throughput ours / llama.cpp (median of the rounds' paired waves): {pairs}")
        per_cpu = ", ".join(
            f"{n} clients {table['ours'][n]['tok_cpu_s'] / table['llama'][n]['tok_cpu_s']:.2f}x"
            for n in versus
            if table["ours"][n]["tok_cpu_s"] and table["llama"][n]["tok_cpu_s"]
        )
        print(f"tokens per CPU-second ours / llama.cpp: {per_cpu}")
    target = report["summary"]["target"]
    if target:
        rounds = ", ".join(f"{r:.2f}x" for r in target["ratio_per_round"])
        same = ", ".join(f"{s}/8" for s in target["identical_per_round"])
        verdict = "met" if target["ratio"] >= 2 and all(s == 8 for s in target["identical_per_round"]) else "NOT met"
        ratio = f"{target['ratio']:.2f}x (rounds {rounds})"
        print(
            f"target: ours 8 concurrent / 8 sequential = {ratio}; answers identical to sequential: {same} -> {verdict}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, nargs="?", help="vlm-export folder served by vlm-serve")
    parser.add_argument("--checkpoint", type=Path, help="the Hugging Face checkpoint it came from (llama.cpp side)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-serve"), help="GGUF cache and server logs")
    parser.add_argument("--llama-cpp-src", type=Path, help="llama.cpp source with convert_hf_to_gguf.py")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrent clients per wave (comma list)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads per server")
    parser.add_argument(
        "--wait-idle", type=float, default=0, help="before each round, wait up to this long for idle CPUs"
    )
    parser.add_argument("--json", type=Path, help="write the report here (with --show: read it)")
    parser.add_argument("--show", action="store_true", help="print the report saved in --json")
    args = parser.parse_args(argv)
    if args.show:
        report = json.loads(args.json.read_text())
        report["summary"] = summarise(report["raw"])
        print_report(report)
        return 0
    if args.export is None:
        parser.error("give the vlm-export folder to serve")
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    if max(args.clients) > len(QUESTIONS):
        parser.error(f"at most {len(QUESTIONS)} clients")
    args.work.mkdir(parents=True, exist_ok=True)

    servers = {"ours": start_ours(args, 18700)}
    llama = start_llama(args, 18701)
    if llama is not None:
        servers["llama"] = llama
    raw: dict[str, dict[str, list]] = {side: {} for side in servers}
    try:
        for server in servers.values():
            server.wait_ready()
            asyncio.run(wave(server, QUESTIONS[:1], args.new_tokens, sequential=True))  # warm-up
        for index in range(args.rounds):
            if args.wait_idle:
                import bench_peers

                bench_peers.wait_until_idle(args.wait_idle)
            order = list(servers) if index % 2 == 0 else list(reversed(servers))
            waves = [(str(c), QUESTIONS[:c], False) for c in args.clients]
            if 8 in args.clients:
                waves.append(("seq8", QUESTIONS[:8], True))
            for name, questions, sequential in waves:
                for side in order:  # the two servers' waves of one size back to back: the pair sees the same load
                    if name == "seq8" and side != "ours":
                        continue
                    result = asyncio.run(wave(servers[side], questions, args.new_tokens, sequential))
                    raw[side].setdefault(name, []).append(result)
                    line = (
                        f"{result['tok_s']:7.1f} tok/s, TTFT p50 {result['ttft_p50']:.2f} s, busy {result['busy']:.2f}"
                    )
                    print(f"round {index + 1} {side:<6} {name:>5}: {line}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    report = {
        "meta": {
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "cpu": cpu_model(),
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "export": str(args.export),
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        },
        "raw": raw,
        "summary": summarise(raw),
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

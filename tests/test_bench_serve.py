"""tools/bench_serve.py end to end on the tiny export (ours only): waves of 1 and 8 clients plus the sequential 8,
and the target's identical-answers check."""

from __future__ import annotations

import json

import pytest
from conftest import load_tool

pytest.importorskip("openai", reason="bench_serve drives the servers with the openai client (the 'dev' extra)")
pytest.importorskip("uvicorn", reason="vlm-serve needs the 'serve' extra")


def test_bench_serve_reports_waves_and_the_target(exported_qwen2_5_vl, tmp_path, capsys):
    bench_serve = load_tool("bench_serve")
    out = tmp_path / "serve.json"
    argv = [str(exported_qwen2_5_vl), "--clients", "1,8", "--new-tokens", "4", "--rounds", "1", "--threads", "1"]
    assert bench_serve.main([*argv, "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    waves = report["raw"]["ours"]
    assert set(waves) == {"1", "8", "seq8"} and "llama" not in report["raw"]
    assert waves["8"][0]["texts"] == waves["seq8"][0]["texts"]  # concurrent answers = sequential ones
    assert waves["1"][0]["texts"] == waves["seq8"][0]["texts"][:1]
    assert all(t == 4 for t in waves["8"][0]["tokens"])
    assert report["summary"]["target"]["identical_per_round"] == [8]
    assert "target: ours 8 concurrent / 8 sequential" in capsys.readouterr().out

"""tools/bench_decoder_loop.py drives a decoder graph correctly: prefill + in-place cache steps give the logits of
one prefill over the whole sequence (a wrong binding, position or mask would not)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool


@pytest.fixture(scope="module")
def loop_module():
    return load_tool("bench_decoder_loop")


class Recorder:
    """Wraps `DecoderLoop._feeds` to keep every step's embeddings, so they can be replayed in one prefill."""

    def __init__(self, loop):
        self.loop, self.embeds = loop, []
        original = loop._feeds

        def feeds(length):
            out = original(length)
            self.embeds.append(out["inputs_embeds"])
            return out

        loop._feeds = feeds


@pytest.mark.parametrize("exported", ["exported_qwen2_5_vl", "exported_qwen3_vl"])
def test_steps_match_one_prefill(loop_module, exported, request):
    graph = request.getfixturevalue(exported) / "decoder.onnx"
    stepped = loop_module.DecoderLoop(graph, threads=1, batch=2, capacity=9, seed=3)
    recorder = Recorder(stepped)
    stepped.step(5)
    for _ in range(3):
        logits = stepped.step()
    assert stepped.total == 8

    whole = loop_module.DecoderLoop(graph, threads=1, batch=2, capacity=8)
    embeds = np.concatenate(recorder.embeds, axis=1)
    whole._feeds = lambda length, original=whole._feeds: {**original(length), "inputs_embeds": embeds}
    reference = whole.step(8)
    assert logits.shape == reference.shape == (2, 1, reference.shape[-1])
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    assert np.abs(logits - stepped.step()).max() > 1e-3  # one more step moves the logits: the check can fail


def test_cli_times_a_graph_and_rejects_a_missing_one(loop_module, exported_qwen2_5_vl, tmp_path, capsys):
    graph = exported_qwen2_5_vl / "decoder.onnx"
    assert (
        loop_module.main(
            [
                str(graph),
                "--rounds",
                "1",
                "--steps",
                "2",
                "--prompt-tokens",
                "3",
                "--threads",
                "1",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "step ms median" in out and str(graph) in out
    assert (tmp_path / "r.json").exists()
    with pytest.raises(SystemExit):
        loop_module.main([str(tmp_path / "missing.onnx")])
    assert "no such graph" in capsys.readouterr().err

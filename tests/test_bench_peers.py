"""tools/bench_peers.py: the text-only checkpoint it hands the peers, and its small helpers (no peer needed)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import TOOLS, load_tool

TOOL = TOOLS / "bench_peers.py"


@pytest.fixture(scope="module")
def bench_peers():
    return load_tool("bench_peers")


HUB_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_config": {"depth": 32, "hidden_size": 1280},
}


def test_text_config_from_hub_layout(bench_peers):
    out = bench_peers.text_config(HUB_CONFIG)
    assert out["architectures"] == ["Qwen2ForCausalLM"] and out["model_type"] == "qwen2"
    assert out["rope_theta"] == 1e6 and out["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert out["tie_word_embeddings"] is True
    assert (out["num_hidden_layers"], out["num_key_value_heads"], out["vocab_size"]) == (24, 2, 151936)
    assert "vision_config" not in out and "rope_scaling" not in out


def test_text_config_from_transformers5_layout(bench_peers):
    """transformers 5 nests the text part in text_config with rope_parameters."""
    text = {k: v for k, v in HUB_CONFIG.items() if k not in ("architectures", "model_type", "vision_config")}
    text.pop("rope_theta")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [8, 12, 12]}
    text["num_hidden_layers"] = 4
    config = {"model_type": "qwen2_5_vl", "tie_word_embeddings": False, "text_config": text}
    out = bench_peers.text_config(config)
    assert out["rope_theta"] == 5e5 and out["num_hidden_layers"] == 4 and out["tie_word_embeddings"] is False


def test_text_config_refuses_other_families(bench_peers):
    with pytest.raises(bench_peers.PeerError, match="llava_onevision"):
        bench_peers.text_config({"model_type": "llava_onevision"})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("model.layers.3.self_attn.q_proj.bias", "model.layers.3.self_attn.q_proj.bias"),
        ("model.language_model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        ("model.language_model.norm.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("visual.blocks.0.attn.qkv.weight", None),
        ("model.visual.merger.mlp.0.weight", None),
    ],
)
def test_text_tensor_name(bench_peers, name, expected):
    assert bench_peers.text_tensor_name(name) == expected


def test_text_tensor_name_refuses_unknown(bench_peers):
    with pytest.raises(bench_peers.PeerError, match="multi_modal_projector"):
        bench_peers.text_tensor_name("multi_modal_projector.linear_1.weight")


def test_leading_agreement_and_step_rate(bench_peers):
    assert bench_peers.leading_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert bench_peers.leading_agreement([1, 2], [1, 2, 3]) == 2
    assert bench_peers.leading_agreement([], [1]) == 0
    assert bench_peers.step_rate([10.0, 10.5, 11.0], batch=4) == pytest.approx(8.0)


def test_compare_logits(bench_peers):
    np = pytest.importorskip("numpy")
    reference = np.arange(20, dtype=np.float32)
    same = bench_peers.compare_logits(reference.copy(), reference)
    assert same["max_abs_diff"] == 0 and same["top1_same"] and same["top10_overlap"] == 10
    swapped = reference.copy()
    swapped[[19, 0]] = swapped[[0, 19]]  # the best id becomes the worst
    other = bench_peers.compare_logits(swapped, reference)
    assert other["max_abs_diff"] == 19 and not other["top1_same"] and other["top10_overlap"] == 9
    assert other["relative_diff"] == pytest.approx(19 / reference.std())


@pytest.mark.parametrize(
    ("layout", "architecture"),
    [
        ("tiny_qwen2_5_vl_dir", "Qwen2ForCausalLM"),
        ("tiny_qwen2_5_vl_v5_dir", "Qwen2ForCausalLM"),
        ("tiny_qwen3_vl_dir", "Qwen3ForCausalLM"),
    ],
)
def test_text_checkpoint_matches_the_vl_text_model(bench_peers, tmp_path, request, layout, architecture):
    """The written text-only checkpoint gives the tiny VL model's text logits (so the peers get the same weights),
    from the hub layout (``model.*``, sharded), the transformers 5 layout (``model.language_model.*``) and
    Qwen3-VL (per-head q/k norms, head_dim apart from hidden_size / heads, interleaved M-RoPE)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vl_dir = request.getfixturevalue(layout)
    text_dir = bench_peers.write_text_checkpoint(vl_dir, tmp_path / "text")
    assert json.loads((text_dir / "config.json").read_text())["architectures"] == [architecture]
    vl = transformers.AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32).eval()
    text = transformers.AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 99, 250, 3, 42, 7]])
    with torch.inference_mode():
        expected = vl(input_ids=ids).logits
        got = text(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_text_checkpoint_keeps_dtypes_in_bounded_shards(bench_peers, tiny_qwen2_5_vl_dir, tmp_path):
    """A bfloat16 checkpoint's text part stays bfloat16 (a 7B: 15 GB, not 30 GB of float32) and is written shard by
    shard with transformers' index, every tensor equal to the source's and in its own dtype (float32 norms stay
    float32); llama.cpp's source GGUF is then bf16 unless an f32 row needs f32."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    src = tmp_path / "bf16"
    src.mkdir()
    for item in tiny_qwen2_5_vl_dir.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            (src / item.name).write_bytes(item.read_bytes())
    source = {}
    for path in sorted(tiny_qwen2_5_vl_dir.glob("*.safetensors")):  # the fixture's files, matrices in bfloat16
        tensors = {k: v.to(torch.bfloat16) if v.ndim == 2 else v for k, v in load_file(path).items()}
        save_file(tensors, str(src / path.name), metadata={"format": "pt"})
        source.update(tensors)
    expected = {bench_peers.text_tensor_name(k): v for k, v in source.items() if bench_peers.text_tensor_name(k)}
    limit = 50_000  # bytes: a few layer tensors per shard; the embedding (too big for any) stands alone
    out = bench_peers.write_text_checkpoint(src, tmp_path / "text", max_shard_bytes=limit)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists() and not (tmp_path / "text.tmp").exists()
    written = {}
    for name in files:
        shard = load_file(out / name)
        assert all(index["weight_map"][k] == name for k in shard)
        assert len(shard) == 1 or sum(t.numel() * t.element_size() for t in shard.values()) <= limit
        written.update(shard)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    assert {t.dtype for t in written.values()} == {torch.bfloat16, torch.float32}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # mixed: no single dtype
    assert bench_peers.gguf_outtype(out, need_f32=False) == "f32"  # float32 norms: f32 keeps them exact

    all_bf16 = {k: v.to(torch.bfloat16) for k, v in expected.items()}
    save_file(all_bf16, str(tmp_path / "b.safetensors"))
    (tmp_path / "b.safetensors").rename(out / "model-00001-of-00001.safetensors")
    for name in files:
        (out / name).unlink()
    assert bench_peers.gguf_outtype(out, need_f32=False) == "bf16"
    assert bench_peers.gguf_outtype(out, need_f32=True) == "f32"


def test_gguf_view_links_the_checkpoint_files_under_the_text_config(bench_peers, tiny_qwen2_5_vl_v5_dir, tmp_path):
    """llama.cpp's converter reads the VL checkpoint's own files through the view (no second copy of the weights)
    under the text checkpoint's config; it drops the vision tensors itself (the GGUF equals the one converted from
    the written text checkpoint: checked by hand, the converter is not installed in CI)."""
    view = bench_peers.write_gguf_view(tiny_qwen2_5_vl_v5_dir, tmp_path / "view" / "text")
    files = sorted(p.name for p in tiny_qwen2_5_vl_v5_dir.glob("*.safetensors*"))
    assert sorted(p.name for p in view.glob("*.safetensors*")) == files
    for name in files:
        assert (view / name).is_symlink() and (view / name).resolve() == (tiny_qwen2_5_vl_v5_dir / name).resolve()
    text = bench_peers.write_text_checkpoint(tiny_qwen2_5_vl_v5_dir, tmp_path / "text")
    assert json.loads((view / "config.json").read_text()) == json.loads((text / "config.json").read_text())
    assert (view / "tokenizer.json").read_bytes() == (text / "tokenizer.json").read_bytes()


def test_plan_shards(bench_peers):
    assert bench_peers.plan_shards([3, 3, 3, 9, 1, 1], max_bytes=6) == [[0, 1], [2], [3], [4, 5]]
    assert bench_peers.plan_shards([1, 2], max_bytes=10) == [[0, 1]]
    assert bench_peers.plan_shards([], max_bytes=10) == []


def test_what_does_not_fit_in_memory_is_skipped_with_a_reason(bench_peers):
    """At 7B (bfloat16, 8.3e9 weights of which 7.6e9 text) on 22 GiB: the reference falls back to bfloat16 and
    onnxruntime-genai's int4 builder is skipped; at 0.5B float32 everything runs as before."""
    gib = 2**30
    big = [
        {"text_name": "model.x", "dtype": "BF16", "numel": 7_600_000_000, "nbytes": 15_200_000_000},
        {"text_name": None, "dtype": "BF16", "numel": 670_000_000, "nbytes": 1_340_000_000},
    ]
    dtype, note = bench_peers.reference_dtype(big, 22 * gib)
    assert dtype == "bfloat16" and "float32 needs ~30.8 GiB, 22.0 GiB available" in note
    dtype, note = bench_peers.reference_dtype(big, 12 * gib)
    assert dtype is None and note.startswith("skipping the transformers reference")
    reason = bench_peers.genai_memory_reason(big, "int4", 22 * gib)
    assert reason.startswith("skipping ortgenai/int4: ") and "~42.5 GiB" in reason and "\n" not in reason
    small = [{"text_name": "model.x", "dtype": "F32", "numel": 500_000_000, "nbytes": 2_000_000_000}]
    assert bench_peers.reference_dtype(small, 22 * gib) == ("float32", None)
    assert bench_peers.genai_memory_reason(small, "int4", 22 * gib) is None
    assert bench_peers.reference_dtype(big, None) == ("float32", None)  # unknown memory: as before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_child_peak_memory_excludes_the_parents(bench_peers):
    """A benchmark child reports its own peak, not its parent's: Linux carries the parent's ru_maxrss across
    fork + exec, which once made every peer's peak the 2.4 GiB the converting parent had held."""
    np = pytest.importorskip("numpy")
    import subprocess

    held = np.ones(1 << 27, dtype=np.float32)  # 512 MiB touched in this (parent) process
    code = (
        "import sys, resource; sys.path.insert(0, sys.argv[1]); import bench_peers; "
        "print(bench_peers._peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(TOOL.parent)], capture_output=True, text=True, check=True)
    peak, inherited = map(float, out.stdout.split())
    assert held.nbytes / 2**20 <= inherited  # the trap this guards against is real on this kernel
    assert peak < 300, peak  # numpy + the tool's imports, far below the parent's 512 MiB


def test_parse_ours(bench_peers, exported_qwen2_5_vl, tmp_path):
    spec = f"fp32={exported_qwen2_5_vl},int4={exported_qwen2_5_vl}"
    assert bench_peers.parse_ours(spec) == {"fp32": exported_qwen2_5_vl, "int4": exported_qwen2_5_vl}
    assert bench_peers.parse_ours("") == {}
    for bad, says in (
        (str(exported_qwen2_5_vl), "is not LABEL=DIR"),
        (f"fp32={exported_qwen2_5_vl},fp32={exported_qwen2_5_vl}", "given twice"),
        (f"fp32={tmp_path}", "not a vlm-export output folder"),
    ):
        with pytest.raises(bench_peers.PeerError, match=says):
            bench_peers.parse_ours(bad)


def test_ratios_pair_ours_with_each_peer_of_the_same_precision(bench_peers):
    def row(b1, b4, prefill, rss):
        return {
            "decode_b1_tok_s": {"median": b1},
            "decode_b4_tok_s": {"median": b4},
            "prefill_tok_s": {"median": prefill},
            "peak_rss_mib": rss,
        }

    report = {
        "results": {
            "ortgenai/int4": row(50.0, 100.0, 200.0, 1000.0),
            "llamacpp/int4": {**row(40.0, 80.0, 250.0, 500.0), "label": "q4_0"},
            "llamacpp/fp32": row(14.0, 40.0, 250.0, 2000.0),
            "ours/int4": row(55.0, 110.0, 200.0, 1500.0),
        }
    }
    assert bench_peers.ratios(report) == [
        "ours/int4 vs ortgenai/int4 (int4): decode b1 1.10x, decode b4 1.10x, prefill 1.00x, peak RSS 1.50x",
        "ours/int4 vs llamacpp/int4 (q4_0): decode b1 1.38x, decode b4 1.38x, prefill 0.80x, peak RSS 3.00x",
    ]


def test_ours_row_decodes_the_prompt_ids_as_transformers(
    bench_peers, tiny_qwen2_5_vl_dir, exported_qwen2_5_vl, tmp_path
):
    """The ``ours`` row runs our runtime on exactly the prompt ids the peers get: its greedy tokens and next-token
    logits are transformers' on the same ids (so its timings are of the same work), at batch 1 and 4."""
    import argparse

    np = pytest.importorskip("numpy")
    pytest.importorskip("transformers")
    prompt = [1, 5, 17, 99, 250, 3, 42, 7, 11, 13]
    args = argparse.Namespace(threads=2, repeats=1, new_tokens=8, batch4=True, check_tokens=8)
    args.child_out = tmp_path / "ours.json"
    ours = bench_peers.child_ours(exported_qwen2_5_vl, prompt, args)
    ours_logits = np.load(tmp_path / "ours.logits.npy")
    args.child_out = tmp_path / "reference.json"
    text_dir = bench_peers.write_text_checkpoint(tiny_qwen2_5_vl_dir, tmp_path / "text")
    reference = bench_peers.child_reference(text_dir, tiny_qwen2_5_vl_dir, prompt, args)
    assert ours["decode_tokens"] == reference["vl_tokens"] == reference["text_tokens"]
    np.testing.assert_allclose(ours_logits, np.load(tmp_path / "reference.logits.npy"), atol=1e-4)
    for key in ("decode_b1_tok_s", "decode_b4_tok_s", "prefill_tok_s"):
        assert ours[key]["median"] > 0, key
    assert ours["peak_rss_mib"] >= ours["rss_after_load_mib"] > 0

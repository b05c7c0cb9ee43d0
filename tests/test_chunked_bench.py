"""`tvkd bench --shapes paper`: the published model shapes, the FLOP count, and one measured step
of each path on tiny shapes (equal losses and gradients, the chunked path's smaller footprint)."""

from __future__ import annotations

import pytest
import torch

from tvkd.bench.paper import LLAMA_3_1_8B, LLAMA_3_2_1B, SHAPES, llama_config, model_flops, train_step_run


@pytest.mark.parametrize("spec,params", [(LLAMA_3_2_1B, 1_235_814_400), (LLAMA_3_1_8B, 8_030_261_248)])
def test_paper_configs_have_the_published_parameter_counts(spec, params):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(spec))
    assert sum(p.numel() for p in model.parameters()) == params
    cfg = model.config
    assert cfg.vocab_size == 128256 and cfg.rope_parameters["rope_theta"] == 500000.0
    assert cfg.rope_parameters["rope_type"] == "llama3"
    assert cfg.tie_word_embeddings is (spec is LLAMA_3_2_1B)


def test_model_flops_count_by_hand():
    spec = {"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 16}
    # per layer: q 8x8 + k,v 8x4 each + o 8x8 + mlp 3x8x16 = 64 + 64 + 64 + 384 = 576 weights
    fwd = 2 * 2 * 576 * (3 + 5) + 2 * 2 * 8 * (9 + 25) + 2 * 8 * 10 * 4
    assert model_flops(spec, [3, 5], scored=4, train=False) == fwd
    assert model_flops(spec, [3, 5], scored=4, train=True) == 3 * fwd


def test_one_step_of_each_path_gives_equal_losses_and_gradients(tmp_path):
    from safetensors.torch import load_file

    tiny = SHAPES["tiny"]
    runs = {}
    for name, options in {"plain": {}, "chunked": {"logprob_chunk": True},
                          "both": {"logprob_chunk": True, "padding_free": True}}.items():
        runs[name] = train_step_run(tiny["student"], tiny["train"][0], options, device="cpu", dtype="float32",
                                    chunk=5, steps=1, warmup=1, grads_out=str(tmp_path / f"{name}.safetensors"))
    assert runs["plain"]["path"] == "full logits"
    assert runs["chunked"]["path"] == "padded, chunked(5)" and runs["both"]["path"] == "padding-free, chunked(5)"
    base = load_file(tmp_path / "plain.safetensors")
    for name in ("chunked", "both"):
        other = load_file(tmp_path / f"{name}.safetensors")
        assert abs(float(other["__loss__"] - base["__loss__"])) <= 1e-5
        assert max(float((other[k] - base[k]).abs().max()) for k in base) <= 1e-5
    r = runs["plain"]
    assert r["tokens"] < r["padded_tokens"]  # the synthetic batch has padding, as real data has
    assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 and "mfu" not in r  # no MFU against a CPU


@pytest.mark.slow
def test_bench_main_on_tiny_shapes_writes_every_configuration(tmp_path):
    import json

    from tvkd.bench.paper import main

    out = tmp_path / "bench.json"
    assert main(device="cpu", shapes_name="tiny", rounds=1, out=out) == 0
    res = json.loads(out.read_text())
    assert res["shapes"] == "tiny" and res["teacher_cache"]["tokens_per_s"] > 0
    rows = res["train"][0]["configs"]
    assert set(rows) == {"plain", "chunked", "padding_free", "chunked+padding_free"}
    for name, r in rows.items():
        assert r["peak_memory_gb"] > 0 and r["tokens_per_s"] > 0
        if name != "plain":  # each configuration ran in its own process; gradients compared across them
            assert r["loss_abs_diff"] <= 1e-5 and r["grad_max_abs_diff"] <= 1e-5

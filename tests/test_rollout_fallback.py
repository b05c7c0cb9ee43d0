"""Rollouts and generation: batched `model.generate` here (no vLLM, no GPU), equal to today's output;
vLLM selectable and forced off by TVKD_GENERATION; the vLLM adapter's calls and output format,
through a stand-in module that answers like `vllm.LLM.generate`."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from tests.conftest import make_tiny_llama, make_tiny_tokenizer
from tvkd.data import PreferenceExample
from tvkd.generation import generate_ids, generation_backend, vllm_generate_ids
from tvkd.modeling import ModelSource
from tvkd.rollouts import greedy_rollouts
from tvkd.tokenize import TokenizeConfig, tokenize_preferences

ROWS = [("sort c a b", "a b c", "c b a"), ("reverse a b", "b a", "a b a b"), ("hello world", "world", "the cat")]


def _tokenized(tok, tmp_path):
    exs = [PreferenceExample(id=str(i), prompt=[{"role": "user", "content": p}],
                             chosen=[{"role": "assistant", "content": c}],
                             rejected=[{"role": "assistant", "content": r}], meta={}) for i, (p, c, r) in enumerate(ROWS)]
    return tokenize_preferences(exs, tok, TokenizeConfig(64, 32), cache_dir=tmp_path / "tok", progress=False)


def test_backend_here_is_transformers(monkeypatch):
    monkeypatch.delenv("TVKD_GENERATION", raising=False)
    assert generation_backend("/some/model/folder") == "hf"  # no vllm and no CUDA on this machine
    assert generation_backend(None) == "hf"
    monkeypatch.setenv("TVKD_GENERATION", "hf")
    assert generation_backend("/some/model/folder") == "hf"


def test_forcing_vllm_without_it_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("TVKD_GENERATION", "vllm")
    with pytest.raises(ValueError, match="TVKD_GENERATION=vllm but"):
        generation_backend("/some/model/folder")
    monkeypatch.setenv("TVKD_GENERATION", "fast")
    with pytest.raises(ValueError, match="must be one of auto, hf, vllm"):
        generation_backend("/x")


def test_rollouts_from_a_folder_fall_back_to_generate_and_equal_it(tmp_path, monkeypatch):
    monkeypatch.delenv("TVKD_GENERATION", raising=False)
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), seed=7)
    model.save_pretrained(tmp_path / "m")
    td = _tokenized(tok, tmp_path)
    source = ModelSource.from_path(tmp_path / "m", dtype="float32", device="cpu")
    out = greedy_rollouts(td, source, side="chosen", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                          max_new_tokens=6, cache_dir=tmp_path / "roll", progress=False)
    prompts = [list(p) for p in td.dataset["prompt_ids"]]
    direct = generate_ids(model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6)
    want = [ids if ids and ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id] for (ids,) in direct]
    assert [list(r) for r in out.dataset["chosen_ids"]] == want
    assert out.dataset["rejected_ids"] == td.dataset["rejected_ids"]
    record = next((tmp_path / "roll").glob("*/*.json"), None) or next((tmp_path / "roll").rglob("*.json"))
    assert '"backend": "hf"' in record.read_text()


class _FakeVLLM:
    """Stands in for vllm: `LLM(model=...)`, `SamplingParams(**kw)`, `llm.generate(prompts, params)` returning
    RequestOutput-like objects whose `outputs[k].token_ids` leave out the special stop token, as vLLM does."""

    def __init__(self, model, eos_id):
        self.model, self.eos_id, self.calls = model, eos_id, []
        mod = types.ModuleType("vllm")
        mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        fake = self

        class LLM:
            def __init__(self, **kw):
                fake.calls.append(("LLM", kw))

            def generate(self, prompts, params, use_tqdm=True):
                fake.calls.append(("generate", prompts, params.kw))
                ids = [p["prompt_token_ids"] for p in prompts]
                outs = generate_ids(fake.model, ids, eos_id=fake.eos_id, pad_id=0, max_new_tokens=params.kw["max_tokens"],
                                    backend="hf")
                result = []
                for (c,) in outs:
                    stopped = bool(c) and c[-1] == fake.eos_id
                    comp = types.SimpleNamespace(token_ids=tuple(c[:-1] if stopped else c),
                                                 finish_reason="stop" if stopped else "length")
                    result.append(types.SimpleNamespace(outputs=[comp]))
                return result

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        mod.LLM, mod.SamplingParams = LLM, SamplingParams
        self.module = mod


def test_vllm_path_calls_its_api_and_keeps_the_output_format(monkeypatch, tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), seed=8)
    fake = _FakeVLLM(model, tok.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TVKD_GENERATION", raising=False)
    assert generation_backend(tmp_path) == "vllm"
    assert generation_backend(None) == "hf"  # an in-memory model stays with transformers
    monkeypatch.setenv("TVKD_GENERATION", "hf")
    assert generation_backend(tmp_path) == "hf"  # forced off
    monkeypatch.delenv("TVKD_GENERATION")
    prompts = [list(p) for p in _tokenized(tok, tmp_path).dataset["prompt_ids"]]
    got = generate_ids(model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=5,
                       model_path=tmp_path)
    want = generate_ids(model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=5,
                        backend="hf")
    assert got == want
    (_, llm_kw), (_, sent, params) = fake.calls[0], fake.calls[1]
    assert llm_kw["model"] == str(tmp_path) and llm_kw["dtype"] == "float32" and llm_kw["trust_remote_code"] is False
    assert sent == [{"prompt_token_ids": p} for p in prompts]
    assert params["temperature"] == 0.0 and params["max_tokens"] == 5 and params["n"] == 1
    assert params["stop_token_ids"] == [tok.eos_token_id] and params["ignore_eos"] is True
    with pytest.raises(ValueError, match="needs do_sample=True"):
        vllm_generate_ids(tmp_path, prompts, eos_id=3, max_new_tokens=2, num_return_sequences=2)


def test_the_rollout_cache_is_keyed_by_its_backend(tmp_path, monkeypatch):
    """A vLLM rollout is cached apart from a `generate` one; the `generate` key is the one of before."""
    import tvkd.generation as generation
    from tvkd.paths import fingerprint
    from tvkd.rollouts import ROLLOUT_VERSION, rollout_key

    monkeypatch.delenv("TVKD_GENERATION", raising=False)
    tok = make_tiny_tokenizer()
    td = _tokenized(tok, tmp_path)
    source = ModelSource.in_memory(make_tiny_llama(len(tok), seed=7), "m")
    assert rollout_key(td.fingerprint, "m", 6, 3, "hf") == fingerprint(ROLLOUT_VERSION, "greedy", td.fingerprint, "m", 6, 3)
    assert rollout_key(td.fingerprint, "m", 6, 3, "vllm") != rollout_key(td.fingerprint, "m", 6, 3, "hf")
    kw = dict(side="chosen", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6,
              cache_dir=tmp_path / "roll", progress=False)
    hf = greedy_rollouts(td, source, **kw)
    monkeypatch.setattr(generation, "generation_backend", lambda path=None, requested=None: "vllm")
    monkeypatch.setattr(generation, "vllm_generate_ids", lambda path, prompts, **k: [([4, 5],) for _ in prompts])
    vllm = greedy_rollouts(td, source, **kw)
    assert not vllm.cached and vllm.fingerprint != hf.fingerprint  # not served from the generate cache
    assert [list(r) for r in vllm.dataset["chosen_ids"]] == [[4, 5, tok.eos_token_id]] * len(ROWS)
    assert len([p for p in (tmp_path / "roll").iterdir() if not p.name.startswith(".")]) == 2

"""TIS-DPO's contrast models really train: their per-token log-probs move away from the initialisation's
(the reference's), in opposite directions for the DPO and the reverse-DPO model, so the token weights
come from the models and not from how ties are broken."""

from __future__ import annotations

import numpy as np

from tests.conftest import PAIRS, make_tiny_llama, make_tiny_tokenizer
from tvkd.api import ContrastModels
from tvkd.cache.teacher import build_reference_cache
from tvkd.data import PreferenceExample
from tvkd.modeling import ModelSource
from tvkd.tokenize import TokenizeConfig, tokenize_preferences


def _log_ratios(out, ref, side: str, name: str) -> list[np.ndarray]:
    return [np.asarray(m, float) - np.asarray(r, float)
            for m, r in zip(out[f"{side}/contrast:{name}_logps"], ref[f"{side}/ref_logps"])]


def test_contrast_models_train_and_disagree(tmp_path):
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok), seed=2, layers=1, hidden=16).save_pretrained(tmp_path / "student")
    exs = [PreferenceExample(id=str(i), prompt=[{"role": "user", "content": p}],
                             chosen=[{"role": "assistant", "content": c}],
                             rejected=[{"role": "assistant", "content": r}], meta={})
           for i, (p, c, r) in enumerate(PAIRS * 4)]
    td = tokenize_preferences(exs, tok, TokenizeConfig(32, 16), cache_dir=tmp_path / "tok", progress=False)
    init = ModelSource.from_path(tmp_path / "student", dtype="float32", device="cpu")
    ref = build_reference_cache(td.dataset, td.fingerprint, init, init.key, pad_id=tok.pad_token_id,
                                cache_dir=tmp_path / "ref", progress=False).dataset
    from tvkd.contrast import contrast_logps

    # 24 pairs in one batch of 32: a single optimiser step, which a warm-up would spend at learning rate 0
    spec = ContrastModels(beta=0.1, learning_rate=1e-3, epochs=1.0, batch_size=32)
    out = contrast_logps(td, ref, init, spec, pad_id=tok.pad_token_id, cache_dir=tmp_path / "contrast",
                         progress=False)
    for side in ("chosen", "rejected"):
        dpo = np.concatenate(_log_ratios(out, ref, side, "dpo"))
        rev = np.concatenate(_log_ratios(out, ref, side, "rev"))
        assert np.abs(dpo).max() > 1e-3 and np.abs(rev).max() > 1e-3, side  # both models moved
        assert np.abs(dpo - rev).mean() > 1e-3, side  # and not the same way: the raw importance is not 0
    # DPO raises the chosen responses relative to the rejected ones; the reverse model does the opposite
    seq = {(s, n): np.array([r.sum() for r in _log_ratios(out, ref, s, n)]) for s in ("chosen", "rejected")
           for n in ("dpo", "rev")}
    assert (seq["chosen", "dpo"] - seq["rejected", "dpo"]).mean() > 0
    assert (seq["chosen", "rev"] - seq["rejected", "rev"]).mean() < 0

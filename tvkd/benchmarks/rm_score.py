"""`rm`: the mean reward-model score of the run's greedy answers to its test prompts.

Any Hugging Face sequence-classification reward model with one output (option ``reward_model``, default
``sfairXC/FsfairX-LLaMA3-RM-v0.1``) scores each (prompt, answer) the way its model card and the TVKD code
(`docs/methods.md` §B.7) do: the chat ``[*prompt, {assistant: answer}]`` is rendered with the reward model's own
chat template as text, the BOS string is removed from that text when the tokenizer adds BOS itself (so BOS is not
doubled), the text is tokenized with the tokenizer's special tokens, and the score is the logit of the single
output (``function_to_apply="none"``). Inputs are batched with right padding and an attention mask; the padding
id is the model's own ``pad_token_id``, so its "rightmost token that is not pad" pooling picks the same position as
an unbatched forward (the pipeline's), even when pad = eos; a model without one gets an id found in none of the
batch's sequences, so it pools each sequence's last token as it does unbatched.

On the testbed (``reward_model: oracle``, the default on testbed runs) the oracle r* sits behind the same
interface: score = `tvkd.testbed.tasks.score(prompt text, answer)`.

Answers: greedy generations of the run's model on ``ctx.test_prompts`` through `tvkd.evaluation.generations`
(``<run_dir>/generations/test-<key>.jsonl``, reused; `run_answers`), shared with the ``alpaca-eval`` benchmark.
Per-answer scores go to ``<run_dir>/rm_scores.jsonl``.

Metrics: ``rm/score`` (mean), ``rm/n`` (answers scored), ``rm/reward_model`` (what scored them). Options of the
reward model are prefixed ``rm_`` (``tvkd eval`` gives every benchmark the same options).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tvkd.benchmarks import BENCHMARKS, BenchContext, boolean, one_of, positive_int
from tvkd.config import DTYPES

DEFAULT_REWARD_MODEL = "sfairXC/FsfairX-LLaMA3-RM-v0.1"
ORACLE = "oracle"
GENERATIONS_NAME = "test"  # <run_dir>/generations/test-<key>.jsonl: greedy answers to the run's test prompts
Chat = Sequence[dict[str, Any]]


# -- the run's answers (shared with alpaca_eval.py) ----------------------------------------------------------------


def answer_decoding(ctx: BenchContext) -> dict[str, Any]:
    """Greedy decoding; ``max_new_tokens`` from the options (default 512, `generations.DEFAULT_DECODING`)."""
    from tvkd.evaluation.generations import DEFAULT_DECODING

    return {**DEFAULT_DECODING, "do_sample": False,
            "max_new_tokens": int(ctx.option("max_new_tokens", DEFAULT_DECODING["max_new_tokens"]))}


class _Lazy:
    """Loads its object on first attribute access: a rerun whose answers are all saved never loads the model."""

    def __init__(self, load: Callable[[], Any]):
        self._load = load
        self._obj: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._obj is None:
            self._obj = self._load()
        return getattr(self._obj, name)


def run_prompts(ctx: BenchContext) -> list[list[dict[str, Any]]]:
    prompts = [list(p) for p in ctx.test_prompts]
    if not prompts:
        why = f" (reading them failed: {ctx.prompts_error})" if getattr(ctx, "prompts_error", None) else ""
        raise ValueError(f"no test prompts to answer{why} for {ctx.run_dir}: the benchmark context holds none")
    return prompts


def run_answers(ctx: BenchContext, prompts: Sequence[Chat] | None = None) -> list[str]:
    """Greedy answers of the run's model to its test prompts, saved in and reused from the run folder."""
    from tvkd.evaluation.generations import generations
    from tvkd.modeling import model_digest

    prompts = run_prompts(ctx) if prompts is None else prompts
    return generations(_Lazy(ctx.model), _Lazy(ctx.tokenizer), prompts, answer_decoding(ctx), ctx.run_dir,
                       GENERATIONS_NAME, model_key=model_digest(ctx.model_dir),
                       batch_size=int(ctx.option("gen_batch_size", 64)), progress=ctx.progress)


def prompt_text(prompt: Chat) -> str:
    """The text of the prompt's last user turn (what the testbed oracle and single-turn judges read)."""
    users = [m for m in prompt if m.get("role") == "user"]
    return str((users or list(prompt))[-1]["content"]) if prompt else ""


# -- reward models -------------------------------------------------------------------------------------------------


class OracleRewardModel:
    """The testbed's oracle r*(x, y) behind the reward-model interface."""

    name = ORACLE

    def score(self, prompts: Sequence[Chat], answers: Sequence[str], progress: bool = False) -> list[float]:
        from tvkd.testbed.tasks import score

        return [float(score(prompt_text(p), a)) for p, a in zip(prompts, answers, strict=True)]


class HFRewardModel:
    """A Hugging Face sequence-classification reward model with a single output, fed its own chat template."""

    def __init__(self, name: str, *, dtype: str | None = "auto", device: str | None = "auto", batch_size: int = 8,
                 trust_remote_code: bool = False, max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tvkd.modeling import (
            ModelLoadError,
            check_model_folder,
            local_model_path,
            resolve_device,
            resolve_dtype,
        )

        self.name = str(name)
        path = local_model_path(self.name)
        if path is None:
            raise ModelLoadError(
                f"reward model {self.name!r} is neither a local folder nor in the local Hugging Face cache "
                "(this harness runs offline). Download it where the hub is reachable "
                f"(`hf download {self.name}`, then copy the cache or set HF_HOME), or give the folder of a "
                "sequence-classification model saved with save_pretrained (option reward_model=<folder>)."
            )
        check_model_folder(path, f"reward model {self.name!r}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - many types; name the model either way
            raise ModelLoadError(f"could not load the tokenizer of reward model {self.name!r} ({path}): "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelLoadError(f"reward model {self.name!r} ({path}) has no chat template: its inputs are "
                                 "formatted with the reward model's own template, so one is required")
        self.device = resolve_device(device)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=resolve_dtype(dtype, self.device), trust_remote_code=trust_remote_code,
                use_safetensors=True)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"could not load reward model {self.name!r} ({path}) as a sequence classifier: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        labels = int(getattr(self.model.config, "num_labels", 1))
        if labels != 1:
            raise ModelLoadError(f"reward model {self.name!r} has {labels} outputs (num_labels); a reward model "
                                 "here has exactly one, whose logit is the score")
        self.model.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.max_length = max_length
        bos = getattr(self.tokenizer, "bos_token", None)
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        # Strip the template's BOS only when tokenizing adds one (the FsfairX card's `.replace(bos_token, "")`).
        self.strip_bos = bool(bos) and bool(probe) and probe[0] == self.tokenizer.bos_token_id

    def format(self, prompt: Chat, answer: str) -> str:
        """The reward model's input text: its chat template of [*prompt, assistant answer], BOS handled."""
        text = self.tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}],
                                                  tokenize=False)
        return text.replace(self.tokenizer.bos_token, "") if self.strip_bos else text

    def encode(self, prompt: Chat, answer: str) -> list[int]:
        """Token ids as the sentiment-analysis pipeline makes them (special tokens added)."""
        kw = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        return list(self.tokenizer(self.format(prompt, answer), add_special_tokens=True, **kw)["input_ids"])

    def score(self, prompts: Sequence[Chat], answers: Sequence[str], progress: bool = False) -> list[float]:
        import torch
        from tqdm.auto import tqdm

        encoded = [self.encode(p, a) for p, a in zip(prompts, answers, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        scores = [0.0] * len(encoded)
        text_cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        own_pad = text_cfg.pad_token_id
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        try:
            with torch.no_grad():
                for batch in tqdm(batches, desc=f"rm {self.name}", disable=not progress, leave=False):
                    seqs = [encoded[i] for i in batch]
                    if own_pad is not None:
                        pad = int(own_pad)
                    else:  # unbatched, the model pools the last token; a pad id found in no sequence keeps that
                        pad = _pad_id_absent_from(seqs, [self.tokenizer.pad_token_id], self.model.config.vocab_size)
                        text_cfg.pad_token_id = pad
                    width = max(len(s) for s in seqs)
                    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(seqs), width), dtype=torch.long)
                    for row, s in enumerate(seqs):
                        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
                        mask[row, : len(s)] = 1
                    logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                    for i, value in zip(batch, logits[:, 0].float().cpu().tolist()):
                        scores[i] = float(value)
        finally:
            text_cfg.pad_token_id = own_pad
        return scores


def _pad_id_absent_from(seqs: Sequence[Sequence[int]], preferred: Sequence[int | None], vocab_size: int) -> int:
    """A token id found in none of ``seqs``: the first of ``preferred`` that is not, else the highest free id."""
    used = {t for s in seqs for t in s}
    for p in preferred:
        if p is not None and 0 <= int(p) < vocab_size and int(p) not in used:
            return int(p)
    for p in range(vocab_size - 1, -1, -1):
        if p not in used:
            return p
    raise ValueError("every token id of the vocabulary occurs in this batch; use rm_batch_size=1")


def load_reward_model(name: str, *, testbed: bool = False, **kwargs: Any) -> OracleRewardModel | HFRewardModel:
    """``oracle`` (testbed runs only) or a reward model's hub id / local folder."""
    if name == ORACLE:
        if not testbed:
            raise ValueError("reward_model=oracle needs a testbed run (the oracle r* only exists on testbed data); "
                             f"give a reward model instead, e.g. reward_model={DEFAULT_REWARD_MODEL}")
        return OracleRewardModel()
    return HFRewardModel(name, **kwargs)


# -- the benchmark -------------------------------------------------------------------------------------------------


@BENCHMARKS.register(
    "rm", description="mean reward-model score of greedy answers to the run's test prompts (FsfairX by default; "
                      "the oracle r* on the testbed)",
    options={
        "reward_model": f"hub id (in the local HF cache) or folder of a 1-output sequence-classification RM, or "
                        f"'oracle' on the testbed (default {DEFAULT_REWARD_MODEL}; 'oracle' on testbed runs)",
        "rm_batch_size": "reward-model forward batch size (default 8)",
        "rm_dtype": "reward-model dtype: auto (bf16 on a GPU that has it, else fp32), bf16, fp16, fp32",
        "rm_max_length": "truncate reward-model inputs to this many tokens (default: no truncation)",
        "rm_trust_remote_code": "allow the reward model's own code (default false)",
        "max_new_tokens": "greedy answers' max new tokens (default 512; shared with alpaca-eval's answers)",
        "gen_batch_size": "generation batch size (default 64)",
    },
    values={"rm_batch_size": positive_int, "rm_dtype": one_of(*DTYPES),
            "rm_max_length": positive_int, "rm_trust_remote_code": boolean, "max_new_tokens": positive_int,
            "gen_batch_size": positive_int},
)
def rm_score(ctx: BenchContext) -> dict[str, Any]:
    from tvkd.paths import atomic_write_text

    name = str(ctx.option("reward_model", ORACLE if ctx.testbed else DEFAULT_REWARD_MODEL))
    kwargs: dict[str, Any] = {}
    if name != ORACLE:
        max_length = ctx.option("rm_max_length")
        kwargs = {"batch_size": int(ctx.option("rm_batch_size", 8)), "dtype": ctx.option("rm_dtype", "auto"),
                  "max_length": int(max_length) if max_length else None,
                  "trust_remote_code": _truthy(ctx.option("rm_trust_remote_code", False))}
    rm = load_reward_model(name, testbed=ctx.testbed, **kwargs)  # fail on a missing RM before generating
    prompts = run_prompts(ctx)
    answers = run_answers(ctx, prompts)
    ctx.say(f"  rm: scoring {len(answers)} answers with {rm.name}")
    scores = rm.score(prompts, answers, progress=ctx.progress)
    rows = [{"prompt": list(p), "answer": a, "score": s} for p, a, s in zip(prompts, answers, scores)]
    atomic_write_text(Path(ctx.run_dir) / "rm_scores.jsonl",
                      "".join(json.dumps({**r, "reward_model": rm.name}, ensure_ascii=False) + "\n" for r in rows))
    return {"rm/score": float(sum(scores) / len(scores)), "rm/n": len(scores), "rm/reward_model": rm.name}


def _truthy(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in {"1", "true", "yes", "on"}

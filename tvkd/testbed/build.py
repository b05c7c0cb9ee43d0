"""Build the testbed: data -> SFT teacher -> teacher pairs -> DPO teacher; SFT student -> student pairs
-> DPO student, each stage content-addressed and cached.

docs/testbed.md §1: a deterministic synthetic preference world with a known oracle reward, built
on demand into a local cache (tokenizer, tiny Llama models saved in the Hugging Face format, data
as JSONL), so that the exact code path of a real run (hub model id -> local folder) is exercised.

Stages (each a folder ``<cache>/<stage>-<key>``; the key is a fingerprint of the config fields the
stage reads, the keys of the stages it reads, and ``TESTBED_VERSION``):

    data           tokenizer/, sft_train.jsonl, test_prompts.jsonl, pair prompts (disjoint prompts)
    teacher_sft    SFT of the teacher on the (flawed) demonstrations
    teacher_pairs  pref_train.jsonl, pref_test.jsonl: on-policy pairs of the SFT teacher
    teacher_dpo    DPO of the SFT teacher on its pairs (reference = SFT teacher)
    student_sft    SFT of the student on the same demonstrations
    student_pairs  student_pref_train.jsonl, student_pref_test.jsonl: on-policy pairs of the SFT student
    student_dpo    plain DPO of the SFT student on its own pairs: does preference data help the student?

A stage is built by `tvkd.storage.cached_stage` (a unique temporary folder renamed into place only
when complete, under a lock), so a kill at any moment leaves either no stage or a finished one,
two processes building the same stage build it once, and a rebuild with nothing changed reads
the stage records and trains nothing. Model folders load with ``AutoModelForCausalLM`` and
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..paths import atomic_write_json, cache_root, content_digest, fingerprint
from ..storage import cached_stage, remove_stale_temps
from . import tasks
from .progress import activity, estimate_build, estimate_stage, format_seconds, labelled_bars

TESTBED_VERSION = 1
"""Bumped whenever a change to this package changes what a stage produces."""

STAGE_FILE = "stage.json"
STAGES: tuple[str, ...] = (
    "data",
    "teacher_sft",
    "teacher_pairs",
    "teacher_dpo",
    "student_sft",
    "student_pairs",
    "student_dpo",
)
MODEL_STAGES: tuple[str, ...] = ("teacher_sft", "teacher_dpo", "student_sft", "student_dpo")
_ALL = STAGES


def _f(default: Any, help: str, stages: Sequence[str] = (), fingerprinted: bool = True) -> Any:
    return field(
        default=default, metadata={"help": help, "stages": tuple(stages), "fingerprinted": fingerprinted}
    )


_PAIRS = ("teacher_pairs", "student_pairs")


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that determines a testbed build.

    Groups: the world (seed, alphabet, lengths, flaw), the data sizes, the teacher and student
    shapes, SFT, on-policy pairs, teacher DPO (β = 0.05, the paper's teacher) and student DPO.
    Each field's metadata names the stages that read it, so changing a field rebuilds exactly
    those stages and the ones downstream of them.

    The defaults start from the second prototype of docs/testbed.md §5 (60% flawed demos, on-policy
    pairs, Bradley–Terry labels at T = 0.1, a low DPO learning rate) with these measured changes,
    chosen only so that the teacher's DPO stage helps robustly:
    - teacher SFT at lr 1e-3, batch 32, 8 epochs: r* 0.763 on seed 0, as good as 12 epochs at
      batch 64 with lr 5e-4 or 1e-3 (0.762, 0.752) in less time, better than lr 2e-3 or 4e-3
      (0.711, 0.539); the student at lr 2e-3 (r* 0.607/0.623/0.611 on seeds 0–2, against
      0.643/0.473/0.611 at 1e-3);
    - teacher DPO for 1 epoch at lr 3e-5 (β = 0.05): greedy r* rose on seeds 0, 1, 2 by +0.046,
      +0.119, +0.055; 2 epochs at 1e-5 or 3e-5 also gained on every seed (+0.033 at least),
      2 epochs at 1e-4 lost on seed 0 (−0.023), the prototype's "lowest learning rate is best";
    - pairs pair the best and the worst of 4 samples, which gives ~8% label noise at T = 0.1 (the
      prototype's random pairs of distinct scores gave 16–17%);
    - Bradley–Terry labels at T = 0.5 (docs/testbed.md §7): 32–33% label noise, as in human
      preference data. At T = 0.1 even a perfect teacher's offsets (the oracle's own score gaps)
      did not move the student (+0.001 over DPO, 5 seeds): with clean labels there is nothing for a
      teacher to add. At T = 0.5 the teacher still gains +0.048 from DPO (0.763 -> 0.810) and the
      student +0.017, and the perfect teacher's offsets help the student on every seed.
    """

    __test__ = False  # not a pytest test class, despite its name

    # The world
    seed: int = _f(0, "Seed of everything: prompts, flaws, inits, data order, sampling and labels.", _ALL)
    num_symbols: int = _f(10, "Size of the list alphabet (a, b, c, ...).", ("data",))
    min_len: int = _f(3, "Shortest list in a prompt.", ("data",))
    max_len: int = _f(10, "Longest list in a prompt (also the largest count answer).", ("data",))
    flaw_rate: float = _f(
        0.6,
        "Fraction of SFT answers that repeat their last element before <eot> (the systematic flaw).",
        ("data",),
    )
    two_turn_rate: float = _f(
        0.2,
        "Fraction of SFT conversations with two user/assistant rounds, so the state after <eot> is trained.",
        ("data",),
    )
    # Data sizes (all prompt sets are disjoint)
    num_sft: int = _f(4000, "SFT conversations.", ("data",))
    num_pref_train: int = _f(4000, "Prompts (one pair each) of the training preference pairs.", ("data",))
    num_pref_test: int = _f(500, "Prompts (one pair each) of the held-out preference pairs.", ("data",))
    num_test: int = _f(1000, "Held-out prompts for greedy evaluation (test_prompts.jsonl).", ("data",))
    # Models
    teacher_layers: int = _f(4, "Teacher transformer blocks.", ("teacher_sft",))
    teacher_hidden: int = _f(128, "Teacher hidden size.", ("teacher_sft",))
    teacher_heads: int = _f(4, "Teacher attention heads.", ("teacher_sft",))
    teacher_intermediate: int = _f(256, "Teacher MLP width.", ("teacher_sft",))
    student_layers: int = _f(2, "Student transformer blocks.", ("student_sft",))
    student_hidden: int = _f(64, "Student hidden size.", ("student_sft",))
    student_heads: int = _f(2, "Student attention heads.", ("student_sft",))
    student_intermediate: int = _f(128, "Student MLP width.", ("student_sft",))
    # SFT
    teacher_sft_epochs: float = _f(8, "Teacher SFT epochs.", ("teacher_sft",))
    teacher_sft_lr: float = _f(1e-3, "Teacher SFT peak learning rate (AdamW, cosine).", ("teacher_sft",))
    student_sft_epochs: float = _f(8, "Student SFT epochs.", ("student_sft",))
    student_sft_lr: float = _f(2e-3, "Student SFT peak learning rate (AdamW, cosine).", ("student_sft",))
    sft_batch_size: int = _f(32, "SFT batch size (conversations).", ("teacher_sft", "student_sft"))
    sft_warmup_ratio: float = _f(
        0.03, "Fraction of SFT steps with linear warm-up.", ("teacher_sft", "student_sft")
    )
    # On-policy pairs
    samples_per_prompt: int = _f(
        4, "On-policy samples per prompt; the best and worst by r* form the pair.", _PAIRS
    )
    sample_temperature: float = _f(1.0, "Sampling temperature of the on-policy samples.", _PAIRS)
    label_temperature: float = _f(
        0.5,
        "Bradley–Terry temperature T: P(a ≻ b) = σ((r*_a − r*_b)/T); lower means less label noise.",
        _PAIRS,
    )
    max_new_tokens: int = _f(
        24,
        "Generation budget for samples and greedy evaluation (answers have ≤ max_len + 1 words).",
        ("teacher_sft", "teacher_pairs", "teacher_dpo", "student_sft", "student_pairs", "student_dpo"),
    )
    # Teacher DPO
    dpo_beta: float = _f(0.05, "Teacher DPO β (the paper's teacher uses 0.05).", ("teacher_dpo",))
    dpo_lr: float = _f(3e-5, "Teacher DPO peak learning rate (AdamW, cosine).", ("teacher_dpo",))
    dpo_epochs: float = _f(1, "Teacher DPO epochs.", ("teacher_dpo",))
    dpo_batch_size: int = _f(
        32, "DPO batch size (pairs), teacher and student.", ("teacher_dpo", "student_dpo")
    )
    dpo_warmup_steps: int = _f(
        20, "DPO linear warm-up steps, teacher and student.", ("teacher_dpo", "student_dpo")
    )
    # Student DPO (a measurement: does plain DPO on the student's own pairs help the SFT student?)
    student_dpo_beta: float = _f(0.1, "Student DPO β (the DPO scale of docs/methods.md §A.3).", ("student_dpo",))
    student_dpo_lr: float = _f(3e-5, "Student DPO peak learning rate.", ("student_dpo",))
    student_dpo_epochs: float = _f(1, "Student DPO epochs.", ("student_dpo",))
    # Execution (not part of any key)
    num_threads: int = _f(
        1,
        "torch CPU threads during the build; weights are bit-identical for a fixed thread count.",
        fingerprinted=False,
    )

    def __post_init__(self) -> None:
        """Every field's type (ints widened to floats, whole floats to ints, as a run config's) and range,
        checked before any stage runs: a wrong value is one line naming the field, not a failure minutes in."""
        import typing

        from tvkd.checks import check_value

        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, check_value(getattr(self, f.name), hints[f.name], f"testbed.{f.name}"))
        problems = []

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                problems.append(f"testbed.{name} must be {rule}, got {getattr(self, name)!r}")

        need(0 <= self.seed < 2**32, "seed", "an integer from 0 to 2**32 - 1")
        need(2 <= self.num_symbols <= 26, "num_symbols", "from 2 to 26 (the letters a..z)")
        need(self.min_len >= 1, "min_len", ">= 1")
        need(self.max_len >= self.min_len, "max_len", f">= min_len ({self.min_len})")
        for name in ("flaw_rate", "two_turn_rate"):
            need(0 <= getattr(self, name) <= 1, name, "a fraction in [0, 1]")
        need(0 <= self.sft_warmup_ratio < 1, "sft_warmup_ratio", "a fraction in [0, 1)")
        for name in ("num_sft", "num_pref_train", "num_pref_test", "num_test", "teacher_layers", "teacher_hidden",
                     "teacher_heads", "teacher_intermediate", "student_layers", "student_hidden", "student_heads",
                     "student_intermediate", "sft_batch_size", "dpo_batch_size", "max_new_tokens", "num_threads"):
            need(getattr(self, name) >= 1, name, ">= 1")
        for who in ("teacher", "student"):
            hidden, heads = getattr(self, f"{who}_hidden"), getattr(self, f"{who}_heads")
            need(heads < 1 or hidden % heads == 0, f"{who}_hidden", f"a multiple of {who}_heads ({heads})")
        need(self.samples_per_prompt >= 2, "samples_per_prompt", ">= 2 (a pair is the best and the worst sample)")
        for name in ("teacher_sft_epochs", "student_sft_epochs", "dpo_epochs", "student_dpo_epochs", "teacher_sft_lr",
                     "student_sft_lr", "dpo_lr", "student_dpo_lr", "dpo_beta", "student_dpo_beta",
                     "sample_temperature", "label_temperature"):
            need(getattr(self, name) > 0, name, "> 0")
        need(self.dpo_warmup_steps >= 0, "dpo_warmup_steps", ">= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def stage_fields(self, stage: str) -> dict[str, Any]:
        """The config fields a stage reads (its share of the cache key)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if stage in f.metadata["stages"]}

    def fingerprint(self) -> str:
        """Fingerprint of every field that can change a result."""
        return fingerprint(
            TESTBED_VERSION,
            {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["fingerprinted"]},
        )


@dataclass(frozen=True)
class Testbed:
    """A built testbed: absolute paths of its folders and files, and its report.

    ``root`` is this configuration's build folder, ``<cache_dir>/builds/<config fingerprint>``,
    holding ``report.json`` and ``testbed.json`` (the config and every stage folder); the stage
    folders themselves live in ``cache_dir``, shared by every configuration that reuses them.
    """

    __test__ = False

    root: Path
    cache_dir: Path
    config: TestbedConfig
    stage_dirs: dict[str, Path]
    report: dict[str, Any]

    @property
    def tokenizer_dir(self) -> Path:
        return self.stage_dirs["data"] / "tokenizer"

    @property
    def teacher_sft_dir(self) -> Path:
        return self.stage_dirs["teacher_sft"]

    @property
    def teacher_dpo_dir(self) -> Path:
        return self.stage_dirs["teacher_dpo"]

    @property
    def student_sft_dir(self) -> Path:
        return self.stage_dirs["student_sft"]

    @property
    def student_dpo_dir(self) -> Path:
        return self.stage_dirs["student_dpo"]

    @property
    def sft_train(self) -> Path:
        return self.stage_dirs["data"] / "sft_train.jsonl"

    @property
    def test_prompts(self) -> Path:
        return self.stage_dirs["data"] / "test_prompts.jsonl"

    @property
    def pref_train(self) -> Path:
        return self.stage_dirs["teacher_pairs"] / "pref_train.jsonl"

    @property
    def pref_test(self) -> Path:
        return self.stage_dirs["teacher_pairs"] / "pref_test.jsonl"

    @property
    def student_pref_train(self) -> Path:
        return self.stage_dirs["student_pairs"] / "student_pref_train.jsonl"

    @property
    def student_pref_test(self) -> Path:
        return self.stage_dirs["student_pairs"] / "student_pref_test.jsonl"

    @property
    def student_pref_train_oracle(self) -> Path:
        """The student's training pairs relabelled by the oracle (`oracle_relabelled`): DPO on them is the
        ceiling control, a student trained on noise-free preferences of the same pairs."""
        return oracle_relabelled(self.student_pref_train, self.cache_dir / "derived")

    @property
    def teacher_dpo_other_vocab_dir(self) -> Path:
        """The DPO teacher behind another vocabulary and template (`tvkd.testbed.vocab`), built once, cached."""
        from tvkd.storage import cached_stage
        from tvkd.testbed.vocab import other_vocabulary

        source = self.teacher_dpo_dir
        def build(tmp: Path) -> dict[str, Any]:
            other_vocabulary(source, tmp / "model")
            return {"source": str(source)}

        stage = cached_stage(self.cache_dir / "other_vocab" / f"v1-{source.name}", build,
                             describe="the testbed teacher with another vocabulary")
        return stage.path / "model"

    @property
    def report_path(self) -> Path:
        return self.root / "report.json"


def oracle_relabelled(source: Path, out_dir: Path) -> Path:
    """A copy of the pairs file ``source`` with every pair ordered by the oracle: where the label chose the
    lower-scored response (``meta.oracle_chosen < meta.oracle_rejected``, a Bradley–Terry label flip) the
    two responses and their scores swap and ``meta.label_flipped`` becomes false; ties stay as labelled.
    Written once per content of ``source`` (``<out_dir>/<stem>_oracle-<digest>.jsonl``, atomically), so
    the file follows the stage it derives from and is never stale."""
    out = Path(out_dir) / f"{Path(source).stem}_oracle-{content_digest(source)}.jsonl"
    if out.exists():
        return out
    rows = []
    for row in read_jsonl(source):
        meta = dict(row.get("meta") or {})
        chosen, rejected = meta.get("oracle_chosen"), meta.get("oracle_rejected")
        if chosen is None or rejected is None:
            raise ValueError(f"{source}: a pair without meta.oracle_chosen/oracle_rejected cannot be relabelled "
                             "by the oracle; rebuild the testbed's pairs stage")
        row = dict(row)
        if chosen < rejected:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            meta["oracle_chosen"], meta["oracle_rejected"] = rejected, chosen
        meta["label_flipped"] = False
        row["meta"] = meta
        rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    write_jsonl(tmp, rows)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# JSONL and stage bookkeeping


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _sub_seed(seed: int, purpose: str) -> int:
    """A per-purpose seed, so stages draw independent streams from the one config seed."""
    return int(fingerprint(seed, purpose), 16) % (2**31)


def stage_label(name: str) -> str:
    """``testbed stage k/n <name>``: how a stage's lines and progress bars name it (k in build order)."""
    return f"testbed stage {STAGES.index(name) + 1}/{len(STAGES)} {name}"


def _run_stage(
    root: Path,
    name: str,
    key: str,
    build: Callable[[Path], dict[str, Any]],
    say: Callable[[str], None],
    estimate: Callable[[], tuple[float, str]] | None = None,
) -> tuple[Path, dict[str, Any], bool]:
    """Return (folder, record, cached): the finished stage folder, built atomically if absent.

    A stage that is built says so first, with ``estimate()`` (seconds, the work counted) when given,
    and its wall time and that estimate when done; a stage found in the cache says "cached".
    """
    label = stage_label(name)
    estimated: list[float] = []

    def build_stage(tmp: Path) -> dict[str, Any]:
        if estimate is None:
            say(f"{label}: building")
        else:
            seconds, work = estimate()
            estimated.append(seconds)
            say(f"{label}: building, estimated {format_seconds(seconds)} ({work})")
        start = time.perf_counter()
        record = build(tmp)
        record = {"stage": name, "key": key, "wall_s": round(time.perf_counter() - start, 3), **record}
        record["files"] = {p.name: content_digest(p) for p in sorted(tmp.iterdir()) if p.name != STAGE_FILE}
        return record

    stage = cached_stage(root / f"{name}-{key}", build_stage, marker=STAGE_FILE, describe=label)
    if stage.cached:
        say(f"{label}: cached   {stage.path}")
    else:
        versus = f" (estimated {format_seconds(estimated[0])})" if estimated else ""
        say(f"{label}: built in {format_seconds(stage.record['wall_s'])}{versus}   {stage.path}")
    return stage.path, stage.record, stage.cached


@contextlib.contextmanager
def _build_environment(num_threads: int, progress: bool) -> Iterator[None]:
    """A fixed torch thread count (bit-identical results need it) and no per-file loading bars."""
    import torch
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    tqdm_env = os.environ.get("TQDM_DISABLE")
    torch.set_num_threads(num_threads)
    hf_logging.disable_progress_bar()
    if not progress:  # TRL's reference-log-prob pass listens only to this variable
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env


# ---------------------------------------------------------------------------------------------
# Stage bodies


def _build_data(cfg: TestbedConfig, out: Path) -> dict[str, Any]:
    """Disjoint prompt sets, flawed SFT conversations, and the tokenizer."""
    from .tokenizer import build_tokenizer

    rng = random.Random(_sub_seed(cfg.seed, "data"))
    draw = {"num_symbols": cfg.num_symbols, "min_len": cfg.min_len, "max_len": cfg.max_len}
    n_sft_prompts = cfg.num_sft + round(cfg.num_sft * cfg.two_turn_rate)
    wanted = cfg.num_test + cfg.num_pref_test + cfg.num_pref_train + n_sft_prompts
    seen: set[str] = set()
    problems: list[tasks.Problem] = []
    for _ in range(50 * wanted):  # distinct prompt texts; short lists are few, so some draws repeat
        if len(problems) == wanted:
            break
        p = tasks.sample_problem(rng, **draw)
        if p.text not in seen:
            seen.add(p.text)
            problems.append(p)
    if len(problems) < wanted:
        raise ValueError(f"only {len(problems)} distinct prompts exist for {draw}; {wanted} are needed")
    cuts = [
        0,
        cfg.num_test,
        cfg.num_test + cfg.num_pref_test,
        cfg.num_test + cfg.num_pref_test + cfg.num_pref_train,
    ]
    test, pair_test, pair_train = (problems[a:b] for a, b in zip(cuts, cuts[1:]))
    sft_problems = problems[cuts[-1] :]

    def prompt_row(prefix: str, i: int, p: tasks.Problem) -> dict[str, Any]:
        meta = {"task": p.task, "ideal": " ".join(p.ideal()), "length": len(p.items)}
        return {"id": f"{prefix}-{i:05d}", "prompt": [{"role": "user", "content": p.text}], "meta": meta}

    sft_rows, flawed_turns, turns = [], 0, 0
    stream = iter(sft_problems)
    two_turn = set(rng.sample(range(cfg.num_sft), n_sft_prompts - cfg.num_sft))
    for i in range(cfg.num_sft):
        messages, meta = [], {"tasks": [], "flawed": []}
        for p in [next(stream)] + ([next(stream)] if i in two_turn else []):
            flawed = rng.random() < cfg.flaw_rate
            answer = tasks.add_flaw(p.ideal()) if flawed else p.ideal()
            messages += [
                {"role": "user", "content": p.text},
                {"role": "assistant", "content": " ".join(answer)},
            ]
            meta["tasks"].append(p.task)
            meta["flawed"].append(flawed)
            flawed_turns += flawed
            turns += 1
        sft_rows.append({"id": f"sft-{i:05d}", "messages": messages, "meta": meta})

    write_jsonl(out / "sft_train.jsonl", sft_rows)
    write_jsonl(out / "test_prompts.jsonl", [prompt_row("test", i, p) for i, p in enumerate(test)])
    write_jsonl(
        out / "pair_prompts_train.jsonl", [prompt_row("pair-train", i, p) for i, p in enumerate(pair_train)]
    )
    write_jsonl(
        out / "pair_prompts_test.jsonl", [prompt_row("pair-test", i, p) for i, p in enumerate(pair_test)]
    )
    tokenizer = build_tokenizer(cfg.num_symbols, cfg.max_len)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return {
        "num_sft_conversations": len(sft_rows),
        "num_sft_turns": turns,
        "sft_flaw_rate": flawed_turns / turns,
        "vocab_size": len(tokenizer),
    }


def _greedy_eval(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    cfg: TestbedConfig,
    out: Path,
    progress: bool = False,
) -> dict:
    """Greedy oracle metrics on the test prompts; the outputs are kept beside the model."""
    from ..generation import generate

    with activity("evaluating"):
        outputs = generate(
            model,
            tokenizer,
            [r["prompt"] for r in rows],
            max_new_tokens=cfg.max_new_tokens,
            progress=progress,
        )
    responses = [o[0] for o in outputs]
    write_jsonl(
        out / "greedy_test.jsonl",
        [
            {"id": r["id"], "response": y, "oracle": tasks.score(r["prompt"][-1]["content"], y)}
            for r, y in zip(rows, responses)
        ],
    )
    return tasks.summarize([r["prompt"][-1]["content"] for r in rows], responses)


def _sft_stage(cfg: TestbedConfig, role: str, data_dir: Path, progress: bool) -> Callable[[Path], dict]:
    def build(out: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from . import models
        from .train import save_model, train_sft

        tokenizer = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
        size = models.ModelSize(  # role is "teacher" or "student", the prefix of its config fields
            num_hidden_layers=getattr(cfg, f"{role}_layers"),
            hidden_size=getattr(cfg, f"{role}_hidden"),
            num_attention_heads=getattr(cfg, f"{role}_heads"),
            intermediate_size=getattr(cfg, f"{role}_intermediate"),
        )
        model = models.init_model(size, tokenizer, seed=_sub_seed(cfg.seed, f"{role}-init"))
        conversations = [r["messages"] for r in read_jsonl(data_dir / "sft_train.jsonl")]
        with activity("training"):  # the trainer's step bar; its dataset bars keep their own names
            model, log = train_sft(
                model,
                tokenizer,
                conversations,
                output_dir=out / "trainer",
                epochs=getattr(cfg, f"{role}_sft_epochs"),
                learning_rate=getattr(cfg, f"{role}_sft_lr"),
                batch_size=cfg.sft_batch_size,
                warmup_ratio=cfg.sft_warmup_ratio,
                seed=_sub_seed(cfg.seed, f"{role}-sft"),
                progress=progress,
            )
        shutil.rmtree(out / "trainer", ignore_errors=True)
        save_model(model, tokenizer, out)
        test_rows = read_jsonl(data_dir / "test_prompts.jsonl")
        metrics = _greedy_eval(model, tokenizer, test_rows, cfg, out, progress)
        return {"parameters": models.num_parameters(model), "eval": metrics, "log": log}

    return build


def _pairs_stage(
    cfg: TestbedConfig, role: str, policy_dir: Path, data_dir: Path, prefix: str, progress: bool
) -> Callable[[Path], dict]:
    def build(out: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .pairs import pair_stats, sample_pairs

        tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
        model = AutoModelForCausalLM.from_pretrained(str(policy_dir))
        record: dict[str, Any] = {}
        for split in ("train", "test"):
            with activity(f"sampling {split}"):
                rows = sample_pairs(
                    model,
                    tokenizer,
                    read_jsonl(data_dir / f"pair_prompts_{split}.jsonl"),
                    samples_per_prompt=cfg.samples_per_prompt,
                    temperature=cfg.sample_temperature,
                    label_temperature=cfg.label_temperature,
                    max_new_tokens=cfg.max_new_tokens,
                    seed=_sub_seed(cfg.seed, f"{role}-pairs-{split}"),
                    num_symbols=cfg.num_symbols,
                    max_len=cfg.max_len,
                    progress=progress,
                )
            write_jsonl(out / f"{prefix}_{split}.jsonl", rows)
            record[split] = pair_stats(rows)
        return record

    return build


def _dpo_stage(
    cfg: TestbedConfig, role: str, sft_dir: Path, pairs_file: Path, data_dir: Path, progress: bool
) -> Callable[[Path], dict]:
    def build(out: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .train import save_model, train_dpo

        prefix = "" if role == "teacher" else "student_"  # teacher fields are dpo_*, student student_dpo_*
        tokenizer = AutoTokenizer.from_pretrained(str(sft_dir))
        policy = AutoModelForCausalLM.from_pretrained(str(sft_dir))
        reference = AutoModelForCausalLM.from_pretrained(str(sft_dir))
        with activity("training"):  # the step bar; TRL's reference pass and dataset bars keep their names
            model, log = train_dpo(
                policy,
                reference,
                tokenizer,
                read_jsonl(pairs_file),
                output_dir=out / "trainer",
                beta=getattr(cfg, f"{prefix}dpo_beta"),
                epochs=getattr(cfg, f"{prefix}dpo_epochs"),
                learning_rate=getattr(cfg, f"{prefix}dpo_lr"),
                batch_size=cfg.dpo_batch_size,
                warmup_steps=cfg.dpo_warmup_steps,
                seed=_sub_seed(cfg.seed, f"{role}-dpo"),
                progress=progress,
            )
        shutil.rmtree(out / "trainer", ignore_errors=True)
        save_model(model, tokenizer, out)
        test_rows = read_jsonl(data_dir / "test_prompts.jsonl")
        metrics = _greedy_eval(model, tokenizer, test_rows, cfg, out, progress)
        return {"eval": metrics, "log": log}

    return build


# ---------------------------------------------------------------------------------------------
# The build


def stage_keys(config: TestbedConfig) -> dict[str, str]:
    """Each stage's cache key: its config fields, its inputs' keys, and the testbed version."""
    deps = {
        "data": (),
        "teacher_sft": ("data",),
        "teacher_pairs": ("teacher_sft",),
        "teacher_dpo": ("teacher_sft", "teacher_pairs"),
        "student_sft": ("data",),
        "student_pairs": ("student_sft",),
        "student_dpo": ("student_sft", "student_pairs"),
    }
    keys: dict[str, str] = {}
    for stage in STAGES:  # topological order
        keys[stage] = fingerprint(
            TESTBED_VERSION, stage, config.stage_fields(stage), {d: keys[d] for d in deps[stage]}, length=12
        )
    return keys


def build_testbed(
    config: TestbedConfig = TestbedConfig(), cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Testbed:
    """Build (or load from the cache) every stage of the testbed and return its paths and report.

    ``cache_dir`` defaults to ``cache_root()/"testbed"``. With ``progress`` (on stderr) a line
    gives the estimated time of the stages to build, and each stage, named ``testbed stage k/7
    <name>`` on its lines and on every progress bar it runs, says that it is cached, or that it
    starts, with an estimate of its time (`tvkd.testbed.progress.estimate_stage`), and when it is
    built, how long it took. Without ``progress`` nothing is printed.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "testbed"
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    keys = stage_keys(config)
    dirs: dict[str, Path] = {}
    records: dict[str, dict[str, Any]] = {}
    cached: dict[str, bool] = {}
    start = time.perf_counter()
    if progress:
        say(_plan(config, root, keys))

    def run(name: str, make: Callable[[], Callable[[Path], dict]]) -> None:
        with labelled_bars(stage_label(name)) if progress else contextlib.nullcontext():
            dirs[name], records[name], cached[name] = _run_stage(
                root, name, keys[name], make(), say, estimate=lambda: estimate_stage(config, name)
            )

    with _build_environment(config.num_threads, progress):
        run("data", lambda: lambda out: _build_data(config, out))
        data = dirs["data"]
        run("teacher_sft", lambda: _sft_stage(config, "teacher", data, progress))
        run(
            "teacher_pairs",
            lambda: _pairs_stage(config, "teacher", dirs["teacher_sft"], data, "pref", progress),
        )
        run(
            "teacher_dpo",
            lambda: _dpo_stage(
                config,
                "teacher",
                dirs["teacher_sft"],
                dirs["teacher_pairs"] / "pref_train.jsonl",
                data,
                progress,
            ),
        )
        run("student_sft", lambda: _sft_stage(config, "student", data, progress))
        run(
            "student_pairs",
            lambda: _pairs_stage(config, "student", dirs["student_sft"], data, "student_pref", progress),
        )
        run(
            "student_dpo",
            lambda: _dpo_stage(
                config,
                "student",
                dirs["student_sft"],
                dirs["student_pairs"] / "student_pref_train.jsonl",
                data,
                progress,
            ),
        )

    report = _report(config, keys, records, cached, time.perf_counter() - start)
    testbed = Testbed(
        root=root / "builds" / config.fingerprint(),
        cache_dir=root,
        config=config,
        stage_dirs=dict(dirs),
        report=report,
    )
    atomic_write_json(testbed.report_path, report)
    atomic_write_json(
        testbed.root / "testbed.json",
        {"config": asdict(config), "stage_dirs": {k: str(v) for k, v in dirs.items()}},
    )
    say(f"testbed: ready in {format_seconds(report['build_wall_s'])}, report {testbed.report_path}")
    return testbed


def _plan(config: TestbedConfig, root: Path, keys: dict[str, str]) -> str:
    """One line before the build: how many stages are to be built and their estimated time in all."""
    todo = [s for s in STAGES if not (root / f"{s}-{keys[s]}" / STAGE_FILE).is_file()]
    if not todo:
        return f"testbed: all {len(STAGES)} stages cached"
    total = estimate_build(config, todo)
    return f"testbed: {len(todo)} of {len(STAGES)} stages to build, estimated {format_seconds(total)} in all"


def _report(
    cfg: TestbedConfig,
    keys: dict[str, str],
    records: dict[str, dict[str, Any]],
    cached: dict[str, bool],
    wall_s: float,
) -> dict[str, Any]:
    """The build's report: per stage its metrics, wall time and key; the headline gains."""
    stages = {}
    for name in STAGES:
        r = records[name]
        entry = {"key": keys[name], "wall_s": r["wall_s"], "cached": cached[name]}
        entry.update({k: v for k, v in r.items() if k not in {"stage", "key", "wall_s", "log", "files"}})
        stages[name] = entry
    oracle = {name: records[name]["eval"]["oracle"] for name in MODEL_STAGES}
    return {
        "seed": cfg.seed,
        "config_fingerprint": cfg.fingerprint(),
        "testbed_version": TESTBED_VERSION,
        "config": asdict(cfg),
        "stages": stages,
        "oracle": oracle,
        "exact_match": {name: records[name]["eval"]["exact_match"] for name in MODEL_STAGES},
        "flaw_rate": {name: records[name]["eval"]["flaw_rate"] for name in MODEL_STAGES},
        "label_noise": {
            "teacher_pairs": records["teacher_pairs"]["train"]["label_noise"],
            "student_pairs": records["student_pairs"]["train"]["label_noise"],
        },
        "teacher_dpo_gain": oracle["teacher_dpo"] - oracle["teacher_sft"],
        "teacher_student_gap": oracle["teacher_sft"] - oracle["student_sft"],
        "student_dpo_gain": oracle["student_dpo"] - oracle["student_sft"],
        "build_wall_s": round(wall_s, 3),
        "stages_wall_s": round(sum(r["wall_s"] for r in records.values()), 3),
    }

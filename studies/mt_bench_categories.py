"""The `mt-bench-categories` study end to end: train, run MT-Bench on every run, rebuild the table and radar.

    python -m studies.mt_bench_categories [--results DIR] [--quick] [--per-category N]

1. `studies.engine.run_study` trains (or finds) every run of ``studies/mt_bench_categories.yaml`` (each keeps its weights).
2. On the testbed, MT-Bench's questions are replaced by testbed tasks written in FastChat's ``llm_judge/data``
   layout (`write_testbed_questions`): ``per_category`` two-turn questions per task (the category), turn 2 another
   task over a fresh list, FastChat's judge prompts copied from the MT-Bench data package, and the ideal
   answers as the reference file FastChat's loader expects. The loopback judge
   (`tvkd.benchmarks.judge_server.serve_judge`) scores each answer by the oracle, so the rating measures the
   answer. The benchmark (`tvkd.benchmarks._run.evaluate`, as ``tvkd eval --bench mt-bench``) runs on every
   run and merges ``mt_bench/category/<task>`` into its metrics; judgements are cached, so a rerun asks nothing.
3. The tables and the radar are rebuilt from the results store by the engine's `write_outputs`, as every
   study ends and as ``tvkd report`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

from studies.engine import load, run_study, write_outputs
from tvkd.paths import results_root
from tvkd.results import ResultsStore
from tvkd.testbed.tasks import TASKS, Problem, symbols

STUDY = "mt-bench-categories"
PER_CATEGORY = 10
QUESTION_SEED = 0
MAX_NEW_TOKENS = 32  # a testbed answer has at most max_len + 1 words


def write_testbed_questions(out_dir: str | Path, per_category: int = PER_CATEGORY, seed: int = QUESTION_SEED,
                            *, num_symbols: int = 10, min_len: int = 3, max_len: int = 10) -> Path:
    """A FastChat ``llm_judge/data`` folder of testbed questions (deterministic from ``seed``); returns it."""
    from tvkd.benchmarks import mt_bench  # lazy: fastchat

    rng = random.Random(seed)
    alphabet = symbols(num_symbols)

    def problem(task: str) -> Problem:
        return Problem(task=task, items=tuple(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len))))

    root = Path(out_dir)
    (root / "mt_bench" / "reference_answer").mkdir(parents=True, exist_ok=True)
    questions, references = [], []
    qid = 1
    for task in TASKS:
        for _ in range(per_category):
            first = problem(task)
            second = problem(rng.choice([t for t in TASKS if t != task]))
            questions.append({"question_id": qid, "category": task, "turns": [first.text, second.text]})
            references.append({"question_id": qid, "model_id": mt_bench.REFERENCE_MODEL, "choices": [
                {"index": 0, "turns": [" ".join(first.ideal()), " ".join(second.ideal())]}]})
            qid += 1
    lines = [json.dumps(q, sort_keys=True) for q in questions]
    (root / "mt_bench" / "question.jsonl").write_text("\n".join(lines) + "\n")
    lines = [json.dumps(r, sort_keys=True) for r in references]
    (root / "mt_bench" / "reference_answer" / f"{mt_bench.REFERENCE_MODEL}.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copyfile(mt_bench.data_dir() / "judge_prompts.jsonl", root / "judge_prompts.jsonl")
    return root


def main(argv: list[str] | None = None) -> int:
    from tvkd.benchmarks._run import evaluate  # lazy: torch, transformers, fastchat
    from tvkd.benchmarks.judge_server import MODEL_NAME, serve_judge  # lazy: openai

    parser = argparse.ArgumentParser(prog="python -m studies.mt_bench_categories", description=__doc__.splitlines()[0])
    parser.add_argument("--results", help="results store root (default $TVKD_RESULTS or ./results)")
    parser.add_argument("--quick", action="store_true", help="the study's --quick runs")
    parser.add_argument("--per-category", type=int, default=PER_CATEGORY, help="questions per testbed task")
    args = parser.parse_args(argv)
    results = Path(args.results) if args.results else results_root()

    spec = load(STUDY)
    trained = run_study(spec, results=results, quick=args.quick, progress=False)
    study_dir = results / spec.study_name(args.quick)
    data = write_testbed_questions(study_dir / "mt_bench_testbed_data", args.per_category)
    # the loopback judge needs no key; the OpenAI client insists on one
    os.environ.setdefault("TVKD_JUDGE_API_KEY", "loopback")
    options = {"judge_model": MODEL_NAME, "data_dir": str(data), "max_new_tokens": MAX_NEW_TOKENS,
               "max_concurrency": 8}
    with serve_judge() as (url, counters):
        runs = list(trained["frame"]["run_dir"])
        for i, run_dir in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] mt-bench on {run_dir}", flush=True)
            evaluate(run_dir, ["mt-bench"], {**options, "judge_base_url": url}, results=results, progress=False,
                     say=lambda msg: None)
        print(f"judge: {counters.requests} requests ({counters.oracle} answers scored by the oracle)", flush=True)
    written = write_outputs(spec, ResultsStore(results), quick=args.quick)["outputs"]  # as every study ends
    for name, paths in written.items():
        for path in paths.values():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

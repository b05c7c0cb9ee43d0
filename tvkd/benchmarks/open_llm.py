"""``oll``: the six Open LLM Leaderboard (v1) tasks the paper reports, scored by lm-eval.

`lm_eval.simple_evaluate` runs lm-eval's ``hf`` model on the model folder (``pretrained=<model_dir>``) over
the tasks of `PAPER_TASKS`, each with the leaderboard's shot count and metric, in one call (the model loads
once). The numbers go to ``oll/<task>`` (a fraction in [0, 1], as lm-eval reports it; the leaderboard shows
×100) and their mean to ``oll/average``; ``oll/config`` records what they depend on: the lm-eval version,
each task's lm-eval name, shot count, metric, version and document count, the batch size(s), dtype,
device, limit and seeds. lm-eval's full results (every metric with its stderr, the task configs) are
written to ``<run_dir>/oll/results.json``.

The leaderboard's settings (the ``openllm`` group of lm-eval, ``lm_eval/tasks/benchmarks/openllm.yaml``):

| key          | lm-eval task     | shots | metric                                    |
|--------------|------------------|-------|-------------------------------------------|
| `arc`        | `arc_challenge`  | 25    | `acc_norm`                                |
| `hellaswag`  | `hellaswag`      | 10    | `acc_norm`                                |
| `mmlu`       | `mmlu` (group)   | 5     | `acc`, mean over the 57 subjects          |
| `truthfulqa` | `truthfulqa_mc2` | 0     | `acc` (MC2: the normalised mass of the true answers) |
| `winogrande` | `winogrande`     | 5     | `acc`                                     |
| `gsm8k`      | `gsm8k`          | 5     | `exact_match` after the `strict-match` filter (``#### <n>``) |

MMLU is the unweighted mean of the subjects' accuracies, as the leaderboard v1 averaged its 57
``hendrycksTest-*`` results (lm-eval's own ``mmlu`` group number weights the subjects by their size; it
is recorded as ``oll/config.tasks.mmlu.lm_eval_group_value``).

Offline and in tests, ``tasks_path`` (lm-eval's ``include_path``) adds a folder of task YAMLs and
``task_map: fixture`` maps the six keys to the fixture tasks of ``tests/fixtures/lm_eval_tasks`` (the same
configs as lm-eval's, on a handful of local documents); ``task_map`` may also be a mapping ``{key: task
name}``. The tasks are loaded with ``tasks_path`` as the working directory, so relative ``data_files`` in
its YAMLs are read relative to it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from tvkd.benchmarks import BENCHMARKS, BenchContext, boolean, either, one_of, positive_int
from tvkd.config import DTYPES


class OllTask(NamedTuple):
    task: str  # lm-eval task (or group) name
    num_fewshot: int
    metric: str  # lm-eval's "<metric>,<filter>" key of its results
    aggregation: str = "task"  # "task": the task's own number; "subtask_mean": unweighted mean over its leaves


#: The paper's six tasks with the Open LLM Leaderboard v1 settings, in the paper's column order.
PAPER_TASKS: dict[str, OllTask] = {
    "arc": OllTask("arc_challenge", 25, "acc_norm,none"),
    "hellaswag": OllTask("hellaswag", 10, "acc_norm,none"),
    "mmlu": OllTask("mmlu", 5, "acc,none", "subtask_mean"),
    "truthfulqa": OllTask("truthfulqa_mc2", 0, "acc,none"),
    "winogrande": OllTask("winogrande", 5, "acc,none"),
    "gsm8k": OllTask("gsm8k", 5, "exact_match,strict-match"),
}

#: The fixture tasks (tests/fixtures/lm_eval_tasks) standing in for the six, same configs on local data.
FIXTURE_TASKS: dict[str, str] = {
    "arc": "tvkd_fixture_arc_challenge",
    "hellaswag": "tvkd_fixture_hellaswag",
    "mmlu": "tvkd_fixture_mmlu",
    "truthfulqa": "tvkd_fixture_truthfulqa_mc2",
    "winogrande": "tvkd_fixture_winogrande",
    "gsm8k": "tvkd_fixture_gsm8k",
}

#: Where the fixture tasks live in a source checkout (the default `tasks_path` of ``task_map: fixture``).
FIXTURE_PATH = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "lm_eval_tasks"

OPTIONS = {
    "tasks": "which of arc, hellaswag, mmlu, truthfulqa, winogrande, gsm8k to run (list or comma-separated; "
             "default: all six, and oll/average is their mean)",
    "limit": "documents per task (lm-eval's limit; an int, or a fraction < 1): for quick checks only",
    "batch_size": "lm-eval batch size (default auto: the largest that fits, detected by lm-eval)",
    "max_batch_size": "the ceiling of batch_size=auto (default 64)",
    "dtype": "model dtype: auto (bf16 on a GPU that has it, else fp32), float32, bfloat16, float16",
    "device": "auto (cuda if available, else cpu), cuda, cuda:1, cpu",
    "tasks_path": "a folder of extra lm-eval task YAMLs (lm-eval's include_path), e.g. tests/fixtures/lm_eval_tasks",
    "task_map": "paper (default: lm-eval's tasks), fixture (the tvkd_fixture_* tasks), or a mapping {key: task}",
    "max_length": "the model's context length for lm-eval (default: from its config)",
    "gen_kwargs": "generation settings overriding the generative tasks' (GSM8K), e.g. {max_gen_toks: 16}",
    "apply_chat_template": "render prompts with the chat template (default false: the leaderboard did not)",
}


def _names(value: Any) -> list[str]:
    if value is None:
        return list(PAPER_TASKS)
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip() for v in items if str(v).strip()]
    by_task = {spec.task: key for key, spec in PAPER_TASKS.items()}
    out = []
    for name in names:
        key = by_task.get(name, name)  # the lm-eval name works too
        if key not in PAPER_TASKS:
            raise ValueError(f"oll: unknown task {name!r}; valid: {', '.join(PAPER_TASKS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("oll: option tasks names no task")
    return out


def task_table(keys: list[str] | None = None, task_map: Any = "paper") -> dict[str, OllTask]:
    """The tasks to run: `PAPER_TASKS` (a subset, in the paper's order) with names per `task_map`."""
    keys = keys or list(PAPER_TASKS)
    if task_map in (None, "paper"):
        names: Mapping[str, str] = {}
    elif task_map == "fixture":
        names = FIXTURE_TASKS
    elif isinstance(task_map, Mapping):
        bad = sorted(set(task_map) - set(PAPER_TASKS))
        if bad:
            raise ValueError(f"oll: task_map names unknown keys {bad}; valid: {', '.join(PAPER_TASKS)}")
        names = {str(k): str(v) for k, v in task_map.items()}
    else:
        raise ValueError(f"oll: task_map must be 'paper', 'fixture' or a mapping {{key: task}}, got {task_map!r}")
    return {k: PAPER_TASKS[k]._replace(task=names.get(k, PAPER_TASKS[k].task)) for k in keys}


def _leaves(name: str, group_subtasks: Mapping[str, list[str]]) -> list[str]:
    """The leaf tasks under a group of lm-eval's results (the name itself for a task)."""
    children = group_subtasks.get(name)
    if not children:
        return [name]
    out: list[str] = []
    for child in children:
        out.extend(_leaves(child, group_subtasks))
    return out


def _float(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def scores_from_results(results: Mapping[str, Any], table: Mapping[str, OllTask]) -> dict[str, dict[str, Any]]:
    """Per key: the number (per the table's metric and aggregation), its version, shots and document counts."""
    res = results["results"]
    groups = results.get("group_subtasks") or {}
    out: dict[str, dict[str, Any]] = {}
    for key, spec in table.items():
        leaves = _leaves(spec.task, groups)
        missing = [t for t in leaves if spec.metric not in res.get(t, {})]
        if missing:
            have = sorted(k for k in res.get(missing[0], {}) if "," in k)
            raise ValueError(f"oll: lm-eval returned no {spec.metric!r} for {missing[0]!r} (task {spec.task!r}); "
                             f"it has {have}")
        values = [float(res[t][spec.metric]) for t in leaves]
        if spec.aggregation == "subtask_mean" or len(leaves) == 1:
            value = sum(values) / len(values)
        else:
            raise ValueError(f"oll: {spec.task!r} is a group; give its aggregation")
        n_samples = results.get("n-samples") or {}
        n_shot = results.get("n-shot") or {}
        entry: dict[str, Any] = {
            "task": spec.task, "metric": spec.metric, "aggregation": spec.aggregation,
            "num_fewshot": sorted({int(n_shot[t]) for t in leaves if t in n_shot}),
            "version": (results.get("versions") or {}).get(spec.task),
            "documents": sum(int(n_samples[t]["effective"]) for t in leaves if t in n_samples),
            "documents_total": sum(int(n_samples[t]["original"]) for t in leaves if t in n_samples),
            "value": value,
        }
        if len(leaves) > 1:
            entry["subtasks"] = len(leaves)
            entry["subtask_versions"] = sorted({str(results["versions"][t]) for t in leaves
                                                if t in (results.get("versions") or {})})
            group_value = _float(res.get(spec.task, {}).get(spec.metric))
            if group_value is not None:
                entry["lm_eval_group_value"] = group_value  # lm-eval's size-weighted group number
        if len(entry["num_fewshot"]) == 1:
            entry["num_fewshot"] = entry["num_fewshot"][0]
        out[key] = entry
    return out


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _gen_kwargs(value: Any) -> dict[str, Any] | None:
    if value in (None, "", {}):
        return None
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        from lm_eval.utils import simple_parse_args_string

        return simple_parse_args_string(value)
    raise ValueError(f"oll: gen_kwargs must be a mapping or 'k=v,k=v', got {value!r}")


def run_lm_eval(model_dir: str | Path, table: Mapping[str, OllTask], *, tasks_path: str | Path | None = None,
                batch_size: int | str = "auto", max_batch_size: int = 64, dtype: str | None = "auto",
                device: str | None = "auto", limit: int | float | None = None, max_length: int | None = None,
                gen_kwargs: dict[str, Any] | None = None, apply_chat_template: bool = False,
                trust_remote_code: bool = False, say: Any = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """One `lm_eval.simple_evaluate` over the table's tasks with their shot counts; (results, settings).

    The tasks are built by a `TaskManager` (lm-eval's tasks plus `tasks_path`) and each leaf task is given its
    shot count before the call (``num_fewshot=None``: simple_evaluate keeps them), so one call runs tasks
    with different shot counts, as lm-eval's ``openllm`` group does.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tvkd.modeling import check_model_folder, resolve_device, resolve_dtype

    check_model_folder(model_dir, "oll")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    # safetensors only, as everywhere in tvkd (`tvkd.modeling`): lm-eval passes it on to from_pretrained
    model_args: dict[str, Any] = {"pretrained": str(model_dir), "dtype": dtype_name,
                                  "trust_remote_code": bool(trust_remote_code), "use_safetensors": True}
    if max_length is not None:
        model_args["max_length"] = int(max_length)
    include = str(Path(tasks_path).resolve()) if tasks_path else None
    wanted = [s.task for s in table.values()]
    # Tasks that tasks_path holds are taken from it alone: indexing lm-eval's own ~10k YAMLs takes seconds.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in wanted):
        manager = TaskManager(include_path=include)
    unknown = [t for t in wanted if t not in manager.all_tasks]
    if unknown:
        hint = "" if tasks_path else " (local task YAMLs: option tasks_path)"
        raise ValueError(f"oll: lm-eval knows no task {unknown}{hint}")
    # relative data_files in the YAMLs of tasks_path are read relative to tasks_path
    with contextlib.chdir(include) if include else contextlib.nullcontext():
        loaded = manager.load(wanted)
    objects, all_leaves = [], []
    for spec in table.values():
        leaves = [t for name, t in loaded["tasks"].items()
                  if name == spec.task or name in _leaf_names(spec.task, loaded)]
        for task in leaves:
            task.set_config(key="num_fewshot", value=int(spec.num_fewshot))
        all_leaves.extend(leaves)
        objects.append(loaded["groups"].get(spec.task) or loaded["tasks"][spec.task])
    context = int(max_length) if max_length is not None else model_context(model_dir, trust_remote_code)
    fitted = fit_generation_lengths(all_leaves, context, gen_kwargs)
    for name, (asked, given) in fitted.items():
        say(f"oll: {name} asks for {asked} new tokens but the model's context is {context} tokens: generating at "
            f"most {given} (lm-eval keeps the last {context - given} tokens of its few-shot prompt); not the "
            "leaderboard's setting")
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=objects, num_fewshot=None, batch_size=batch_size,
        max_batch_size=int(max_batch_size), device=str(dev), limit=limit, gen_kwargs=gen_kwargs,
        apply_chat_template=bool(apply_chat_template), task_manager=manager, log_samples=False,
    )
    seconds = time.perf_counter() - t0
    if results is None:  # a non-zero rank of a distributed launch
        raise RuntimeError("oll: lm-eval returned no results on this process (not rank 0)")
    cfg = results.get("config") or {}
    settings = {
        "lm_eval": lm_eval.__version__, "model_args": model_args, "batch_size": batch_size,
        "batch_sizes": [int(b) for b in cfg.get("batch_sizes") or []], "max_batch_size": int(max_batch_size),
        "device": str(dev), "dtype": dtype_name, "limit": limit, "max_length": max_length,
        "gen_kwargs": gen_kwargs, "apply_chat_template": bool(apply_chat_template), "tasks_path": include,
        "seeds": {k: cfg.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
        "context_length": context,
        "fitted_generation_lengths": {k: {"asked": a, "given": g} for k, (a, g) in fitted.items()},
        "seconds": seconds,
    }
    return results, settings


LM_EVAL_MAX_GEN_TOKS = 256  # lm-eval's HFLM.max_gen_toks: a generative task's budget when it names none


def model_context(model_dir: str | Path, trust_remote_code: bool = False) -> int:
    """The model's context length as lm-eval's ``hf`` model resolves it (`lm_eval.models.utils.resolve_max_length`:
    its config's n_positions / max_position_embeddings / n_ctx, else the tokenizer's model_max_length)."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - the config alone usually says it
        tokenizer = None
    return int(resolve_max_length(config, tokenizer))


def fit_generation_lengths(tasks: list[Any], context: int, gen_kwargs: dict[str, Any] | None
                           ) -> dict[str, tuple[int, int]]:
    """Cap the generative tasks' ``max_gen_toks`` at half the model's context (lm-eval asserts it is below it, and
    the prompt needs the rest): {task: (asked, given)} for each task changed. ``gen_kwargs`` (the user's, applied
    by lm-eval over the task's) is capped in place too."""
    fitted: dict[str, tuple[int, int]] = {}
    cap = max(1, context // 2)
    if gen_kwargs and gen_kwargs.get("max_gen_toks") is not None and int(gen_kwargs["max_gen_toks"]) >= context:
        fitted["gen_kwargs"] = (int(gen_kwargs["max_gen_toks"]), cap)
        gen_kwargs["max_gen_toks"] = cap
    for task in tasks:
        if getattr(task, "OUTPUT_TYPE", None) != "generate_until" and \
                getattr(task.config, "output_type", None) != "generate_until":
            continue
        gk = dict(task.config.generation_kwargs or {})
        asked = int((gen_kwargs or {}).get("max_gen_toks") or gk.get("max_gen_toks") or LM_EVAL_MAX_GEN_TOKS)
        if asked >= context:
            task.set_config(key="generation_kwargs", value={"max_gen_toks": cap}, update=True)
            fitted[str(task.config.task)] = (asked, cap)
    return fitted


def _leaf_names(name: str, loaded: Mapping[str, Any]) -> set[str]:
    group = (loaded.get("groups") or {}).get(name)
    return {t.task_name for t in group.get_all_tasks()} if group is not None else set()


def _by(check: Any, what: str) -> Any:
    """A value rule from one of the checks above: ``what`` it expects, with the check's own message."""
    def rule(v: Any) -> str | None:
        try:
            check(v)
        except ValueError as e:
            return f"{what} ({str(e).removeprefix('oll: ')})"
        return None
    return rule


def _limit(v: Any) -> str | None:
    ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (isinstance(v, float) and 0 < v < 1)
    return None if ok else "an integer >= 1 (documents per task) or a fraction in (0, 1)"


VALUES = {"tasks": _by(_names, "task names"), "task_map": _by(lambda v: task_table(None, v), "a task map"),
          "limit": _limit,
          "batch_size": either(positive_int, one_of("auto")), "max_batch_size": positive_int,
          "dtype": one_of(*DTYPES),
          "max_length": positive_int, "apply_chat_template": boolean}


@BENCHMARKS.register(
    "oll", description="Open LLM Leaderboard v1 (ARC, HellaSwag, MMLU, TruthfulQA, Winogrande, GSM8K) with lm-eval",
    options=OPTIONS, values=VALUES,
)
def open_llm(ctx: BenchContext) -> dict[str, Any]:
    from lm_eval.utils import handle_non_serializable

    keys = _names(ctx.option("tasks"))
    task_map = ctx.option("task_map", "paper")
    tasks_path = ctx.option("tasks_path")
    if task_map == "fixture" and not tasks_path:
        if not FIXTURE_PATH.is_dir():
            raise ValueError(f"oll: task_map=fixture needs tasks_path (no fixture tasks at {FIXTURE_PATH})")
        tasks_path = FIXTURE_PATH
    table = task_table(keys, task_map)
    limit = ctx.option("limit")
    if isinstance(limit, str):
        limit = float(limit) if "." in limit else int(limit)
    batch_size = ctx.option("batch_size", "auto")
    if isinstance(batch_size, str) and batch_size.isdigit():
        batch_size = int(batch_size)
    cfg = ctx.config
    ctx.say(f"oll: lm-eval on {ctx.model_dir}: " + ", ".join(f"{k}={s.task}/{s.num_fewshot}-shot"
                                                              for k, s in table.items()))
    results, settings = run_lm_eval(
        ctx.model_dir, table, tasks_path=tasks_path, batch_size=batch_size,
        max_batch_size=int(ctx.option("max_batch_size", 64)), dtype=ctx.option("dtype", "auto"),
        device=ctx.option("device", "auto"), limit=limit,
        max_length=int(ctx.option("max_length")) if ctx.option("max_length") is not None else None,
        gen_kwargs=_gen_kwargs(ctx.option("gen_kwargs")),
        apply_chat_template=_bool(ctx.option("apply_chat_template", False)),
        trust_remote_code=bool(getattr(getattr(cfg, "models", None), "trust_remote_code", False)), say=ctx.say,
    )
    scores = scores_from_results(results, table)
    out_dir = Path(ctx.run_dir) / "oll"
    out_dir.mkdir(parents=True, exist_ok=True)
    detail = {k: results.get(k) for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                                          "higher_is_better", "n-samples", "config")}
    (out_dir / "results.json").write_text(json.dumps(detail, indent=2, default=handle_non_serializable,
                                                     ensure_ascii=False) + "\n", encoding="utf-8")
    metrics: dict[str, Any] = {f"oll/{k}": s["value"] for k, s in scores.items()}
    for k, sc in scores.items():
        metrics[f"oll/{k}/n"] = int(sc["documents"])  # the documents behind the number
    metrics["oll/average"] = sum(s["value"] for s in scores.values()) / len(scores)
    metrics["oll/config"] = {
        **settings, "task_map": task_map if isinstance(task_map, str) else dict(task_map),
        "average_over": list(scores),
        # the paper's numbers: all six of lm-eval's tasks, every document, the tasks' own generation settings
        "paper_setting": (list(scores) == list(PAPER_TASKS) and task_map in (None, "paper") and limit is None
                          and not settings["gen_kwargs"] and settings["max_length"] is None
                          and not settings["apply_chat_template"] and not settings["fitted_generation_lengths"]),
        "tasks": {k: {kk: vv for kk, vv in s.items() if kk != "value"} for k, s in scores.items()},
        "results_file": str(out_dir / "results.json"),
    }
    return metrics

"""The `tvkd` command line.

    tvkd testbed build                      build (or reuse) the embedded testbed
    tvkd data inspect argilla/dpo-mix-7k    counts, skipped rows and rendered examples of a source
    tvkd run configs/my-run.yaml            train + evaluate one configuration (idempotent)
    tvkd study run reward-conflict          the paper's Table 5 on the testbed, with controls
    tvkd report --study reward-conflict     its tables rebuilt from the results store (--compare-paper)
    tvkd losses | tvkd aux-rewards          what is registered, with what each needs
    tvkd bench                              speed/memory ratios against the targets
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from textwrap import dedent


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    # transformers reads this when it is imported; a command that never needs it (a config typo) never pays for it
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        transformers.logging.set_verbosity_error()


def cmd_testbed_build(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from tvkd.config import load_yaml
    from tvkd.testbed import TestbedConfig, build_testbed

    overrides = {}
    for item in args.set or []:
        k, eq, v = item.partition("=")
        if not eq or not k:
            print(f"error: --set {item!r}: expected FIELD=VALUE, e.g. label_temperature=0.3", file=sys.stderr)
            return 2
        try:
            overrides[k] = load_yaml(v)  # YAML 1.2 numbers: 1e-5 is a number
        except yaml.YAMLError as e:
            print(f"error: --set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})", file=sys.stderr)
            return 2
    fields = {f.name for f in dataclasses.fields(TestbedConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        print(f"error: unknown testbed option(s) {bad}; valid: {', '.join(sorted(fields))}", file=sys.stderr)
        return 2
    if "seed" in overrides and args.seed != 0 and overrides["seed"] != args.seed:
        print(f"error: --seed {args.seed} and --set seed={overrides['seed']} disagree; give one", file=sys.stderr)
        return 2
    overrides.setdefault("seed", args.seed)
    cfg = TestbedConfig(**overrides)  # types and ranges checked here, before any stage
    tb = build_testbed(cfg, cache_dir=args.cache_dir, progress=not args.quiet)
    print(f"testbed ready in {tb.root}")
    report = tb.report if isinstance(tb.report, dict) else {}
    oracle, exact = report.get("oracle", {}), report.get("exact_match", {})
    for stage in ("teacher_sft", "teacher_dpo", "student_sft", "student_dpo"):
        if stage in oracle:
            print(f"  {stage:<12} greedy oracle score {oracle[stage]:.3f}  exact match {exact.get(stage, float('nan')):.3f}")
    if "label_noise" in report:
        print("  label noise: " + ", ".join(f"{k} {v:.3f}" for k, v in report["label_noise"].items()))
    print(f"report: {Path(tb.root) / 'report.json'}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from tvkd.data.render import inspect_source

    if args.n < 0:
        raise ValueError(f"-n must be >= 0 (examples to render), got {args.n}")
    source = args.source
    if source.startswith("testbed:"):  # the embedded testbed's data, as a run config names them
        from tvkd.pipeline import TESTBED_PARTS, resolve

        models = [p for p, attr in TESTBED_PARTS.items() if attr.endswith("_dir")]  # model and tokenizer folders
        if source.removeprefix("testbed:") in models:
            data = [p for p in TESTBED_PARTS if p not in models and p != "test_prompts"]
            raise ValueError(f"{source} is a model (or tokenizer) folder of the testbed, not data; its data parts: "
                             + ", ".join(f"testbed:{p}" for p in data))
        if source == "testbed:test_prompts":
            raise ValueError("testbed:test_prompts holds prompts only, no responses; inspect testbed:pref_test or "
                             "testbed:student_pref_test (their pairs)")
        source = resolve(source, progress=True)
        if args.source == "testbed:sft_train":  # SFT conversations, not pairs
            args.kind = "sft"
    print(inspect_source(source, split=args.split, n=args.n, kind=args.kind, adapter=args.adapter))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tvkd.config import load_config

    cfg = load_config(args.config, sets=args.set)  # checked before torch, transformers and datasets are imported
    from tvkd.pipeline import execute, plan_run
    from tvkd.results import ResultsStore

    store = ResultsStore(args.results)
    if args.dry_run:
        plan = plan_run(cfg, progress=not args.quiet)
        record = store.load(plan.key, study=cfg.study, name=cfg.name, complete_only=False)
        state = record.state if record is not None else "not run yet"
        print(f"run {cfg.name!r}: {state}; {'would rerun (--force)' if args.force else ''}".rstrip("; "))
        print(f"  run folder: {store.run_dir(plan.key, study=cfg.study, name=cfg.name)}")
        print("  inputs (content fingerprints; a change makes a new run):")
        for role, digest in plan.inputs.items():
            print(f"    {role:<20} {digest}  {plan.paths[role.split('.')[1]]}")
        return 0
    rec = execute(cfg, store=store, force=args.force, progress=not args.quiet)
    from tvkd.distributed import is_main_process

    if is_main_process():  # under a multi-process launch, one line, from the process that wrote the run
        print(f"results: {rec.run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tvkd.benchmarks._run import evaluate, list_text, parse_options

    if args.list or not args.target:
        print(list_text())
        return 0 if args.list else 2
    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    ev = evaluate(args.target, benches, parse_options(args.option), results=args.results, progress=not args.quiet,
                  threads=args.threads, strict=False)
    print(f"metrics merged into {ev.run_dir / 'metrics.json'}")
    if ev.failed:
        print(f"error: {ev.failure_message()}", file=sys.stderr)
        return 1
    return 0


def cmd_judge_server(args: argparse.Namespace) -> int:
    import time

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535 (0 picks a free one), got {args.port}")
    for flag in ("delay", "slow_first", "drop_first", "fail_first", "garbage_first"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    for flag in ("max_body", "max_n"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 400 <= args.fail_status <= 599:
        raise ValueError(f"--fail-status must be an HTTP error status from 400 to 599, got {args.fail_status}")

    from tvkd.benchmarks.judge_server import JudgeServer, log

    handler = logging.StreamHandler(sys.stderr)  # one numbered line per request
    handler.setFormatter(logging.Formatter("%(asctime)s judge-server %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        server = JudgeServer(port=args.port, delay=args.delay, slow_first=args.slow_first, fail_first=args.fail_first,
                             fail_status=args.fail_status, drop_first=args.drop_first,
                             garbage_first=args.garbage_first, max_body=args.max_body, max_n=args.max_n).start()
    except OSError as e:  # the port is taken, or below 1024 without the right
        raise ValueError(f"--port {args.port}: cannot listen on 127.0.0.1:{args.port} ({e.strerror or e}); pick "
                         "another port, or 0 for a free one") from None
    print(f"judge server (the testbed oracle) at {server.base_url}; e.g. "
          f"tvkd eval <run> --bench mt-bench,alpaca-eval --option judge_base_url={server.base_url} "
          f"--option judge_model=tvkd-oracle-judge   (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(1)
    finally:
        server.stop()


def cmd_results_gc(args: argparse.Namespace) -> int:
    from tvkd.results import ResultsStore

    store = ResultsStore(args.results)
    found = store.gc(args.study, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path, reason in found:
        print(f"{verb} {path}  ({reason})")
    print(f"{verb} {len(found)} item(s) from {store.root}" if found else f"nothing to remove in {store.root}")
    return 0


def _executor(args: argparse.Namespace):
    """The executor of ``--backend`` (the same spelling for `study run` and `study search`)."""
    if args.backend == "sequential":
        if args.address:
            raise ValueError("--address names a Ray cluster: give it with --backend ray")
        from studies.engine import Sequential

        return Sequential()
    from studies.ray_executor import RayExecutor

    if args.address:  # seconds, not Ray's minutes of retries after the whole study is planned
        from studies.ray_session import check_reachable

        check_reachable(args.address)
    return RayExecutor(address=args.address, max_concurrent=args.max_concurrent)


def _backend_arguments(p: argparse.ArgumentParser) -> None:
    """``--backend``, ``--address``, ``--max-concurrent``: where the runs of `study run` / `study search` happen."""
    p.add_argument("--backend", choices=["sequential", "ray"], default="sequential",
                   help="sequential (one run after another, here) or ray (Ray Tune trials: in parallel on this "
                        "machine, or on a cluster with --address); finished runs are never trained again either way")
    p.add_argument("--address", default=None, help="with --backend ray: an existing Ray cluster, HOST:PORT (the "
                                                   "cluster's auth token, if it uses one, as Ray reads it: "
                                                   "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    p.add_argument("--max-concurrent", type=int, default=None, help="with --backend ray: trials at once (default: "
                                                                   "as many as the resources allow)")


def cmd_study_run(args: argparse.Namespace) -> int:
    from studies.engine import run_study

    out = run_study(args.name, _executor(args), seeds=args.seeds, results=args.results, out_dir=args.out,
                    quick=args.quick, progress=not args.quiet, profile=args.profile)
    for paths in out["outputs"].values():
        for p in paths.values():
            print(f"table: {p}")
    return 1 if out.get("failed") else 0


def cmd_study_search(args: argparse.Namespace) -> int:
    from studies.search import cli_search

    return cli_search(args)


def cmd_study_plan(args: argparse.Namespace) -> int:
    import json

    from studies.plan import format_plan, plan_study

    plan = plan_study(args.spec, args.results, quick=args.quick, seeds=args.seeds, progress=not args.quiet,
                      profile=args.profile)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0


def cmd_study_list(args: argparse.Namespace) -> int:
    from studies import STUDIES

    for name in STUDIES.names():
        print(f"{name:<20} {STUDIES.meta(name).get('description', '')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reports.store import NoCompleteRuns, report_study
    from studies import STUDIES

    if bool(args.study) == bool(args.all):
        print("error: give --study <name> (a registered study or a study YAML) or --all", file=sys.stderr)
        return 2
    names = STUDIES.names() if args.all else [args.study]
    if args.study and not (args.study.endswith((".yaml", ".yml")) and Path(args.study).is_file()):
        STUDIES.get(args.study)  # an unknown name: the registry's error, with the valid names
    built, empty = [], []
    for name in names:
        out = args.out if not args.all or not args.out else Path(args.out) / name
        try:
            rep = report_study(name, args.results, out, quick=args.quick, profile=args.profile,
                               compare_paper=args.compare_paper)
        except NoCompleteRuns as e:
            if not args.all:
                print(f"error: {e}", file=sys.stderr)
                return 1
            empty.append(f"{name} (no complete runs)")
            continue
        except (ValueError, KeyError) as e:  # --all: a study whose spec or runs cannot be read is named, not fatal
            if not args.all:
                raise
            empty.append(f"{name} ({_one_line(e)})")
            continue
        built.append(name)
        for note in rep.notices:
            print(f"notice: {note}")
        for generator, paths in rep.files.items():
            for path in paths.values():
                print(f"{generator}: {path}")
        if args.compare_paper:
            print(rep.comparison_text, end="")
    if args.all:
        print(f"built: {', '.join(built) if built else 'none'}")
        print(f"nothing built: {', '.join(empty) if empty else 'none'}")
    return 0 if built else 1


def cmd_losses(args: argparse.Namespace) -> int:
    import dataclasses

    from tvkd.losses import LOSSES

    for name in sorted(LOSSES.names()):
        cls, meta = LOSSES.get(name), LOSSES.meta(name)
        print(f"{name}: {meta.get('citation', '')}")
        if args.verbose:
            print(f"    needs: {meta.get('needs', '')}   ({cls.__module__})")
            for f in dataclasses.fields(cls.Config):
                print(f"    {f.name} = {f.default!r}: {f.metadata.get('help', '')}")
    return 0


def cmd_aux(args: argparse.Namespace) -> int:
    from tvkd.aux_rewards import AUX_REWARDS, TABLE5

    # the paper's Table 5 in its order, then any other registered aux reward
    for name in [*TABLE5, *sorted(set(AUX_REWARDS.names()) - set(TABLE5))]:
        meta = AUX_REWARDS.meta(name)
        print(f"{name:<12} {meta.get('kind', ''):<7} {meta.get('formula', '')}   ({AUX_REWARDS.where(name)})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from tvkd.config import RunConfig, describe

    print("Run config keys (YAML), with defaults:")
    print("\n".join(describe(RunConfig)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.shapes == "paper":
        from tvkd.bench.paper import PARTS
        from tvkd.bench.paper import main as paper_main

        parts = [x.strip() for x in (args.parts or ",".join(PARTS)).split(",") if x.strip()]
        return paper_main(device=args.device or "auto", quick=args.quick, parts=parts)
    given = [flag for flag, value in (("--parts", args.parts), ("--device", args.device)) if value is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        print(f"error: {' and '.join(given)} {verb} to --shapes paper only; add --shapes paper, or drop "
              f"{'it' if len(given) == 1 else 'them'}", file=sys.stderr)
        return 2
    from tvkd.bench import bench_output
    from tvkd.bench.targets import main as bench_main

    rc = bench_main(quick=args.quick, per_loss=not args.targets_only, ddp=args.ddp)
    if args.sweeps:
        import json

        from tvkd.bench.sweeps import bench_ray_speedup

        print("\nsweeps: the same 4-run testbed grid through Ray Tune at 1 and at 2 trials at once:", flush=True)
        res = bench_ray_speedup(concurrency=(1, 2), quick=True)
        out = bench_output("bench.json")
        saved = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**saved, "ray": res}, indent=2))
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tvkd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=dedent("""\
            Preference distillation harness: TVKD and its baselines on one trainer, one teacher
            cache and one results store. Runs offline; the embedded testbed stands in for hub
            models and data sets (`testbed:<part>` in any config)."""),
        epilog=dedent("""\
            examples:
              tvkd testbed build                       # tokenizer, data, SFT/DPO teacher, SFT student
              tvkd data inspect argilla/dpo-mix-7k     # what a data set turns into, and what is skipped
              tvkd config                              # every run-config key with its help
              tvkd run my-run.yaml --set loss.alpha=0.5
              tvkd study run reward-conflict           # Table 5 on the testbed (resumable)
              tvkd report --study reward-conflict --compare-paper   # its tables again, beside the paper's
            Caches live in $TVKD_CACHE (default ~/.cache/tvkd); results in $TVKD_RESULTS (./results)."""),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tb = sub.add_parser("testbed", help="the embedded synthetic testbed").add_subparsers(dest="sub", required=True)
    b = tb.add_parser("build", help="build (or reuse) the testbed; prints its oracle scores and where it is",
                      description="Builds tokenizer, data, SFT teacher -> DPO teacher and SFT student, each "
                                  "stage cached by content; a rebuild with nothing changed trains nothing.")
    b.add_argument("--seed", type=int, default=0, help="changes data sampling, inits and labels (default 0)")
    b.add_argument("--cache-dir", default=None, help="where stages are stored (default $TVKD_CACHE/testbed)")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a TestbedConfig field")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_testbed_build)

    data = sub.add_parser("data", help="inspect data sources").add_subparsers(dest="sub", required=True)
    d = data.add_parser("inspect", help="counts, skipped rows by reason, and a few rendered examples",
                        description="SOURCE is a hub id (argilla/dpo-mix-7k, nvidia/HelpSteer2, "
                                    "HuggingFaceH4/deita-10k-v0-sft), a .jsonl/.parquet file, a folder, or a data "
                                    "part of the embedded testbed (testbed:pref_train, testbed:student_pref_test, "
                                    "testbed:sft_train, ...).")
    d.add_argument("source")
    d.add_argument("--split", default="train")
    d.add_argument("-n", type=int, default=3, help="examples to render (default 3)")
    d.add_argument("--kind", choices=["preference", "sft"], default="preference",
                   help="what the source holds: preference pairs (default) or SFT conversations")
    d.add_argument("--adapter", default=None, help="the data set adapter to read it with (default: chosen from "
                                                  "the hub id or the columns); the error for an unknown one lists them")
    d.set_defaults(func=cmd_data_inspect)

    r = sub.add_parser("run", help="train and evaluate one YAML configuration (does nothing if already done)",
                       description="Runs data -> tokenize -> caches -> train -> evaluate and writes one run "
                                   "directory keyed by the config and the content of its inputs. See `tvkd config` "
                                   "for the keys. Several processes (DDP): `accelerate launch --multi_gpu "
                                   "--num_processes 2 -m tvkd run cfg.yaml` (on a CPU box too: gloo) or `torchrun "
                                   "--nproc_per_node 2 -m tvkd run cfg.yaml`; per_device_train_batch_size is per "
                                   "process, caches are built once, only the main process writes the store.")
    r.add_argument("config", help="a YAML run config")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted key, e.g. loss.alpha=0.5")
    r.add_argument("--results", default=None, help="results store root (default $TVKD_RESULTS or ./results)")
    r.add_argument("--force", action="store_true", help="rerun even if the results store has it")
    r.add_argument("--dry-run", action="store_true",
                   help="check every input and print the run's folder, state and input fingerprints; train nothing")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="run benchmarks on a finished run (RM score, AlpacaEval, MT-Bench, the Open LLM "
                                     "Leaderboard, margin accuracy, value KL, the shaping figure)",
                        description="Evaluates a run folder of the results store (it must keep its weights: train "
                                    "with train.save_model: true) or a run config (run first, keeping the weights), "
                                    "and merges the metrics into the run's metrics.json. `tvkd eval --list` lists "
                                    "the benchmarks and their options.")
    ev.add_argument("target", nargs="?", help="a run folder (results/<study>/<run>) or a run config file")
    ev.add_argument("--bench", default="margin", help="comma-separated benchmarks, e.g. rm,alpaca-eval,mt-bench,oll")
    ev.add_argument("--option", action="append", metavar="KEY=VALUE",
                    help="a benchmark option, e.g. judge_model=gpt-4o-mini (values parsed as YAML)")
    ev.add_argument("--results", default=None, help="results store root (default $TVKD_RESULTS or ./results)")
    ev.add_argument("--list", action="store_true", help="list the benchmarks and their options")
    ev.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for generation and scoring (default: torch's, one per core)")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    js = sub.add_parser("judge-server", help="an OpenAI-compatible judge on loopback backed by the testbed oracle",
                        description="Serves /v1/chat/completions on 127.0.0.1, answering MT-Bench and AlpacaEval "
                                    "judge prompts with the testbed oracle's verdicts, so those benchmarks run "
                                    "their real client paths on the testbed.")
    js.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0 picks a free one)")
    js.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each answer (test timeouts)")
    js.add_argument("--slow-first", type=int, default=None, help="delay only the first N requests (default: all)")
    js.add_argument("--drop-first", type=int, default=0,
                    help="close the connection without an answer for the first N requests")
    js.add_argument("--fail-first", type=int, default=0, help="then answer HTTP --fail-status to the next N requests")
    js.add_argument("--fail-status", type=int, default=500, help="the status of --fail-first (default 500)")
    js.add_argument("--garbage-first", type=int, default=0, help="then answer unparseable text to the next N")
    js.add_argument("--max-body", type=int, default=4 * 1024 * 1024, help="largest request body in bytes (413 above)")
    js.add_argument("--max-n", type=int, default=8, help="largest 'n' (completions per request) accepted")
    js.set_defaults(func=cmd_judge_server)

    res = sub.add_parser("results", help="the results store").add_subparsers(dest="sub", required=True)
    g = res.add_parser("gc", help="remove failed, interrupted and stale run folders and leftover checkpoints",
                       description="Removes run folders that are failed, interrupted, left 'running' by a process "
                                   "that is gone, or unreadable, and the checkpoints of finished runs that did not "
                                   "ask to keep them (train.keep_checkpoints). Complete runs are never touched.")
    g.add_argument("--results", default=None, help="results store root (default $TVKD_RESULTS or ./results)")
    g.add_argument("--study", default=None, help="only this study's runs")
    g.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    g.set_defaults(func=cmd_results_gc)

    st = sub.add_parser("study", help="run a paper table / figure").add_subparsers(dest="sub", required=True)
    s = st.add_parser("run", help="run every configuration of a study (resumable), then write its tables")
    s.add_argument("name", help="a registered study, e.g. reward-conflict (see `tvkd study list`), or a study "
                                "YAML file of your own")
    s.add_argument("--seeds", type=int, nargs="+", default=None, help="override the study's seeds")
    s.add_argument("--results", default=None, help="results store root (default $TVKD_RESULTS or ./results)")
    s.add_argument("--out", default=None, help="where tables go (default <results>/<study>/tables)")
    s.add_argument("--quick", action="store_true", help="a much smaller grid for a smoke test")
    s.add_argument("--profile", default=None, help="a profile of the study, e.g. paper: the paper's models, data "
                                                   "sets and hyper-parameters by hub id (results in <study>-paper)")
    _backend_arguments(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_study_run)
    se = st.add_parser("search", help="hyperparameter search over one run config (Optuna TPE + median pruning; "
                                      "resumable from its storage)",
                       description="Searches the params of a search spec (dotted run-config keys with ranges) "
                                   "for the best value of a run metric; a killed search resumes from its storage "
                                   "without repeating finished trials; writes <results>/<study>/best.yaml.")
    se.add_argument("spec", help="a search spec YAML, e.g. studies/examples/alpha_search.yaml")
    se.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///<results>/.optuna/<study>.db)")
    se.add_argument("--n-trials", type=int, default=None, help="complete + pruned trials wanted (default: the spec's)")
    se.add_argument("--study-name", default=None)
    se.add_argument("--results", default=None, help="results store root (default $TVKD_RESULTS or ./results)")
    _backend_arguments(se)
    se.add_argument("--quiet", action="store_true")
    se.set_defaults(func=cmd_study_search)
    sp = st.add_parser("plan", help="which runs of a study are done, what is left, and how long it should take",
                       description="Expands a study (variants and axes), checks every run config, and says which "
                                   "runs the results store already holds and an estimate of the remaining time from "
                                   "the store's measured run times.")
    sp.add_argument("spec", help="a registered study or a study YAML file")
    sp.add_argument("--results", default=None, help="results store root (default $TVKD_RESULTS or ./results)")
    sp.add_argument("--seeds", type=int, nargs="+", default=None, help="override the study's seeds")
    sp.add_argument("--quick", action="store_true", help="the study's quick grid")
    sp.add_argument("--profile", default=None, help="a profile of the study, e.g. paper; adds an estimate of "
                                                    "GPU-hours from model sizes and token counts (offline)")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_study_plan)
    sl = st.add_parser("list", help="list the studies")
    sl.set_defaults(func=cmd_study_list)

    rp = sub.add_parser("report", help="rebuild a study's tables and figures from the results store (and compare "
                                       "them with the paper's)",
                        description="Reads only the results store: every table generator of the study (reports/) "
                                    "is run on its complete runs; outputs are byte-identical from run to run. "
                                    "--compare-paper prints each cell the paper has beside ours: ranks, Kendall's "
                                    "τ and signs on the testbed, values (ours − paper) with --profile paper.")
    rp.add_argument("--study", default=None, help="a registered study (see `tvkd study list`) or a study YAML")
    rp.add_argument("--all", action="store_true", help="every registered study; says which had no complete runs")
    rp.add_argument("--results", default=None, help="results store root (default $TVKD_RESULTS or ./results)")
    rp.add_argument("--out", default=None, help="where outputs go (default <results>/<study>/tables; with --all, "
                                                "one folder per study under it)")
    rp.add_argument("--quick", action="store_true", help="the study's --quick runs (<study>-quick)")
    rp.add_argument("--profile", default=None, help="the runs of a profile, e.g. paper (<study>-paper)")
    rp.add_argument("--compare-paper", action="store_true",
                    help="print (and write paper_<table>.md/.png/.pdf) the paper's published cells beside ours")
    rp.set_defaults(func=cmd_report)

    lo = sub.add_parser("losses", help="list registered losses (-v: with their options)")
    lo.add_argument("-v", "--verbose", action="store_true")
    lo.set_defaults(func=cmd_losses)
    ax = sub.add_parser("aux-rewards", help="list the aux rewards (the paper's Table 5)")
    ax.set_defaults(func=cmd_aux)
    cf = sub.add_parser("config", help="every run-config key with its default and help")
    cf.set_defaults(func=cmd_config)
    be = sub.add_parser("bench", help="speed / memory ratios measured in one process")
    be.add_argument("--quick", action="store_true", help="fewer repetitions")
    be.add_argument("--ddp", action="store_true",
                    help="also a 2-process CPU DDP step against a 1-process step at the same global batch")
    be.add_argument("--sweeps", action="store_true",
                    help="also the 4-run testbed grid through Ray Tune at 1 and at 2 concurrent trials (the "
                         "speed-up, beside this machine's own headroom for 2 busy processes)")
    be.add_argument("--targets-only", action="store_true",
                    help="only the four target ratios, not the step time of every registered loss")
    be.add_argument("--shapes", choices=("testbed", "paper"), default="testbed",
                    help="paper: teacher-cache and TVKD-step throughput, MFU and peak memory on Llama-3.1-8B / "
                         "Llama-3.2-1B shapes (random weights; scaled down, same vocabulary, on a CPU), with and "
                         "without chunked log-probs and padding-free batches")
    be.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                    help="with --shapes paper: where to run (default auto: CUDA when present)")
    be.add_argument("--parts", default=None,
                    help="with --shapes paper (default all three): any of cache (the teacher cache's one-pass and full-logits paths "
                         "against the bare forward), order (padded, length-bucketed and padding-free steps over "
                         "DPO-MIX-like lengths), train (the TVKD step's options against the plain step)")
    be.set_defaults(func=cmd_bench)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that report a user's input or a state the user can fix: one `error:` line, no traceback.

    Only the modules already imported are asked for their classes: an error raised before training
    started cannot be the trainer's, and importing it (torch, transformers) costs seconds."""
    names = {"tvkd.results": ("HashCollisionError", "RunAlreadyCompleteError", "RunInProgressError"),
             "tvkd.training.trainer": ("NonFiniteLossError",), "jinja2.exceptions": ("TemplateError",)}
    found: list[type[BaseException]] = [ValueError, KeyError, OSError, ImportError]
    for module, classes in names.items():
        if module in sys.modules:
            found.extend(getattr(sys.modules[module], c) for c in classes)
    return tuple(found)


def _one_line(e: BaseException) -> str:
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" while writing {e.filename}" if e.filename else ""
        return (f"no space left on device{where}: free space, or point TVKD_CACHE / TVKD_RESULTS at a disk that has "
                "some; finished stages and runs are kept, rerun the same command to continue")
    text = str(e) if not isinstance(e, KeyError) else str(e.args[0]) if e.args else repr(e)
    return " ".join(text.split("\n")).strip() or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during a run
        print(f"interrupted ({e or 'Ctrl-C'}): finished stages and runs are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()) or os.environ.get("TVKD_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

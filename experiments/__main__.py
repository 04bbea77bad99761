"""`python -m experiments`: run the paper's tables as suites, report them beside the paper, plan their cost.

python -m experiments list
python -m experiments run table3 --budget paper --launcher slurm --partition gpu --seeds 0 1 2 --array
python -m experiments run arl_vs_nal --budget cpu-mini --data-dir ../shared/data --parallel 1
python -m experiments run table3 --budget paper --launcher list > commands.txt
python -m experiments report table3 --budget paper --wandb
python -m experiments plan table3 --budget paper --measure
python -m experiments plan all --budget paper cpu-mini
python -m experiments responses --model attention164_cifar --compare learning=arl,nal
python -m experiments masks --run-dir runs/cifar10-attention92
python -m experiments curves --run-dir runs/cifar10-attention92 --metric val/acc1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.curves import CurveError
from experiments.launch import command_list, make_jobs, run_local
from experiments.sbatch import SlurmOptions, run_slurm
from experiments.suites import BUDGETS, SuiteError, load_suite, suite_names
from ran.train.allocator import keep_freed_memory
from ran.train.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the suites, their runs and the paper's figures")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("suite", help=f"one of {', '.join(suite_names())}, or an alias such as table3")
        p.add_argument("--budget", default="paper", choices=BUDGETS)
        p.add_argument("--root", type=Path, default=Path("runs"), help="folder of the run directories")
        p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (run: default 0)")

    run = sub.add_parser("run", help="launch a suite's runs")
    common(run)
    run.add_argument("--launcher", default="local", choices=("local", "slurm", "list"))
    run.add_argument("--runs", nargs="+", help="only these runs of the suite")
    run.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
    run.add_argument("--threads", type=int, help="local: torch threads per run (default: cores / parallel)")
    run.add_argument(
        "--data-dir", help="the dataset folder, passed to every run as --data.init_args.data_dir"
    )
    run.add_argument("--dry-run", action="store_true", help="slurm: write the scripts, do not submit")
    run.add_argument("--partition", help="slurm: partition")
    run.add_argument(
        "--time",
        help="slurm: time limit of a job (default: the suite's, else CIFAR 24:00:00, ImageNet 72:00:00)",
    )
    run.add_argument(
        "--cpus-per-task",
        type=int,
        help="slurm: CPUs per task (default: the suite's, else CIFAR 8, ImageNet 16)",
    )
    run.add_argument("--mem", help="slurm: memory per node (e.g. 0 for all of it)")
    run.add_argument("--account", help="slurm: account")
    run.add_argument("--array", action="store_true", help="slurm: one script per run, its seeds a job array")
    run.add_argument(
        "--pack",
        type=int,
        default=1,
        metavar="N",
        help="slurm: N single-device runs side by side in one job, sharing its GPU and CPUs",
    )
    run.add_argument(
        "--setup", default="", help="slurm: shell lines before the job (e.g. 'module load cuda')"
    )
    run.epilog = (
        "Arguments after `--` are passed to every `ran fit` and `ran test` "
        "(e.g. -- --trainer.precision bf16-mixed)."
    )

    rep = sub.add_parser("report", help="the suite's table beside the paper's, from the run directories")
    common(rep)
    rep.add_argument(
        "--out", type=Path, help="where to write the .md, .csv and .png (default: the suite's folder)"
    )
    rep.add_argument(
        "--wandb",
        action="store_true",
        help="also log the table and chart to W&B (a run of job type 'report' in the suite's group; online "
        "with an API key, else offline into the --out folder)",
    )

    plan = sub.add_parser(
        "plan", help="runs, iterations, training FLOPs and device-hours of a suite under budgets"
    )
    plan.add_argument(
        "suite", help="a suite, an alias such as table3, or 'all' for one line per suite and budget"
    )
    plan.add_argument("--budget", nargs="+", default=["paper"], choices=BUDGETS)
    plan.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per run (default: one)")
    plan.add_argument(
        "--measure",
        action="store_true",
        help="time each network's training step on this machine (ran.bench) and give the hours",
    )
    plan.add_argument("--step-steps", type=int, default=6, help="with --measure: timed steps per network")
    plan.epilog = (
        "Arguments after `--` are the `ran` overrides the runs will get (e.g. -- --trainer.precision "
        "bf16-mixed --model.channels_last true): the plan counts and measures with them."
    )

    curves = sub.add_parser("curves", help="a metric per validation over a fit, as a PNG and a table")
    curves.add_argument(
        "--run-dir", type=Path, action="append", required=True, help="a run directory (repeatable)"
    )
    curves.add_argument("--metric", default="val/acc1", help="a val/ metric (default val/acc1)")
    curves.add_argument("--out", type=Path, help="the PNG (default: <first run>/analysis/curve_<metric>.png)")

    for name in ("responses", "masks"):
        sub.add_parser(
            name, help=f"the paper's analyses: see `python -m experiments {name} --help`", add_help=False
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # plan --measure and the analyses train and run networks in this process
    if argv and argv[0] in ("responses", "masks"):
        from experiments.analysis.cli import main as analysis_main  # deferred: wandb and matplotlib

        return analysis_main(argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = _parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = overrides
    try:
        if args.command == "list":
            return _list()
        if args.command == "plan":
            return _plan(args)
        if args.command == "curves":
            from experiments.curves import curves

            table, path = curves(args.run_dir, args.metric, args.out)
            print(table)
            print(f"written: {path}")
            return 0
        suite = load_suite(args.suite)
        if args.command == "run":
            return _run(args, suite)
        if args.command == "report":
            from experiments.report import chart_path, report

            text, md, csv_path = report(
                suite, args.budget, args.root, args.out, args.seeds, to_wandb=args.wandb
            )
            print(text)
            print(f"written: {md}, {csv_path}, {chart_path(md)}" + ("; logged to W&B" if args.wandb else ""))
            return 0
        raise AssertionError(args.command)
    except (SuiteError, ConfigError, CurveError, RuntimeError, FileNotFoundError) as err:
        print(f"python -m experiments: error: {err}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    from experiments.plan import plan, plan_all

    seeds = args.seeds or [0]
    if args.suite == "all":
        print(
            plan_all(
                args.budget,
                seeds=len(seeds),
                measure=args.measure,
                steps=args.step_steps,
                extra=args.overrides,
            )
        )
        return 0
    suite = load_suite(args.suite)
    print(
        "\n\n".join(
            plan(
                suite, budget, seeds=seeds, measure=args.measure, steps=args.step_steps, extra=args.overrides
            )
            for budget in args.budget
        )
    )
    return 0


def _list() -> int:
    for name in suite_names():
        suite = load_suite(name)
        alias = f" ({', '.join(suite.aliases)})" if suite.aliases else ""
        print(f"{name}{alias}: {suite.title} [{suite.paper_ref}], {len(suite.runs)} runs")
        for run in suite.runs:
            paper = ", ".join(f"{k} {v}" for k, v in run.paper.items()) or "no published figure"
            config = (
                run.config.relative_to(Path.cwd()) if run.config.is_relative_to(Path.cwd()) else run.config
            )
            print(f"  {run.name:34s} {config}  paper: {paper}")
    return 0


def _run(args: argparse.Namespace, suite) -> int:
    extra = list(args.overrides)
    if args.data_dir:
        extra = ["--data.init_args.data_dir", args.data_dir, *extra]
    jobs = make_jobs(suite, args.budget, args.seeds or [0], args.root, args.runs, extra)
    if args.launcher == "list":
        print("\n".join(command_list(jobs)))
        return 0
    if args.launcher == "slurm":
        options = SlurmOptions(
            partition=args.partition,
            time=args.time,
            cpus_per_task=args.cpus_per_task,
            mem=args.mem,
            account=args.account,
            setup=args.setup,
            array=args.array,
            pack=args.pack,
        )
        run_slurm(jobs, options, submit=not args.dry_run)
        return 0
    try:
        statuses = run_local(jobs, parallel=args.parallel, threads=args.threads)
    except KeyboardInterrupt:
        print(
            "experiments run: interrupted; the running runs saved last.ckpt, and the same command resumes "
            "the suite where it stopped",
            file=sys.stderr,
        )
        return 130
    failed = [name for name, status in statuses.items() if status]
    print(
        f"{len(statuses) - len(failed)} of {len(statuses)} runs finished"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The `bertfast` command: `bertfast info`, `bertfast pretrain`, `bertfast export`, `bertfast demo`,
`bertfast bench` (`bertfast static-report` = `bertfast bench --static`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bertfast", description="Fast BERT-family encoders for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices, compiled parts, and the backends each op can use here")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    from bertfast.pretrain import command as pretrain_command

    pretrain = sub.add_parser("pretrain", help="pretrain BERT, ALBERT, RoBERTa or ELECTRA (default: ELECTRA-tiny on "
                              "the standard library's docstrings)")
    pretrain_command.add_pretrain_arguments(pretrain)
    export = sub.add_parser("export", help="write a pretraining run's checkpoint as a transformers folder")
    pretrain_command.add_export_arguments(export)
    demo = sub.add_parser("demo", help="one pretraining step of BERT, ALBERT, RoBERTa and ELECTRA on random data")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seq-len", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="run the benchmarks on whatever device is here and print a table (ms, "
                           "TFLOP/s or GB/s, peak MiB, speedup vs each baseline); --static: the kernels' "
                           "compile report",
                           description="Runs benchmarks/test_<op>.py under pytest-benchmark (needs the source tree) "
                           "and writes DIR/bench.json, bench.csv, bench.md and speedup.png. On a machine without "
                           "CUDA it measures the CPU paths and lists the GPU implementations it could not measure. "
                           "Exit status 0 when every case passed or skipped, 1 when one failed.")
    from bertfast.bench import KNOWN_OPS, PRESETS

    bench.add_argument("--ops", metavar="OP[,OP...]", help=f"the ops to run (default: all): {', '.join(KNOWN_OPS)}")
    bench.add_argument("--preset", choices=PRESETS, default=None,
                       help="small: a few cases per op, seconds each (CI); default: every case")
    bench.add_argument("--out", metavar="DIR", help="results folder (default: bench-results/<UTC timestamp>); "
                       "with --static: the Markdown file to write")
    bench.add_argument("--benchmarks", metavar="PATH", help="the benchmarks folder (default: the source tree's, "
                       "next to the bertfast package)")
    bench.add_argument("--static", action="store_true", help="instead of timing: compile every Triton kernel config "
                       "for sm_80 and sm_90 (no GPU needed) and tabulate registers, spills, shared memory and HGMMA")
    _static_arguments(bench, out=False)
    static = sub.add_parser("static-report", help="alias of `bertfast bench --static`: compile every Triton kernel "
                            "config for sm_80 and sm_90 (no GPU needed) and tabulate registers, spills, shared "
                            "memory and HGMMA use", description="Alias of `bertfast bench --static` (kept for the "
                            "commands already written down): compiles every Triton kernel config the dispatchers can "
                            "pick for sm_80 and sm_90 with no GPU and tabulates registers, spills, shared memory and "
                            "HGMMA use.")
    _static_arguments(static, out=True)
    args = parser.parse_args(argv)

    if args.command == "info":
        from bertfast import info as info_mod

        report = info_mod.collect()
        print(json.dumps(report, indent=2, default=str) if args.json else info_mod.render(report))
    elif args.command in ("pretrain", "export"):
        run = pretrain_command.run_pretrain if args.command == "pretrain" else pretrain_command.run_export
        try:
            return run(args)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            parser.error(f"{args.command}: {e}")
        except KeyboardInterrupt:  # the trainer has written a checkpoint and said where
            return 130
    elif args.command == "demo":
        from bertfast import demo as demo_mod

        if args.batch < 1 or args.seq_len < 8:
            parser.error("--batch must be >= 1 and --seq-len >= 8")
        demo_mod.run(batch=args.batch, seq_len=args.seq_len, seed=args.seed)
    elif args.command == "static-report" or (args.command == "bench" and args.static):
        from bertfast.bench import BenchError, runner

        if args.command == "bench":
            given = [flag for flag, value in (("--ops", args.ops), ("--preset", args.preset),
                                              ("--benchmarks", args.benchmarks)) if value is not None]
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                parser.error(f"bench --static: {', '.join(given)} {verb} to the timed benchmarks, not to --static")
        try:
            command = f"bertfast {args.command}" + (" --static" if args.command == "bench" else "")
            return runner.static_report(quick=args.quick, part=args.part or "all", jobs=args.jobs, out=args.out,
                                        command=command)
        except BenchError as e:
            parser.error(f"{args.command}: {e}")
    elif args.command == "bench":
        from bertfast.bench import BenchError, runner

        given = [flag for flag, value in (("--quick", args.quick), ("--part", args.part), ("--jobs", args.jobs))
                 if value not in (None, False)]
        if given:
            parser.error(f"bench: {', '.join(given)} {'goes' if len(given) == 1 else 'go'} only with --static")
        command = "bertfast " + shlex.join(argv if argv is not None else sys.argv[1:])
        try:
            return runner.bench(ops=args.ops, preset=args.preset or "default", out=args.out,
                                benchmarks=args.benchmarks, command=command)
        except BenchError as e:
            parser.error(f"bench: {e}")
        except KeyboardInterrupt:
            return 130
    return 0


def _static_arguments(parser: argparse.ArgumentParser, out: bool) -> None:
    """The static report's flags, shared by `bench --static` and its alias `static-report` (which
    alone takes --out PATH here: `bench --out` is the results folder, or the report with --static)."""
    note = "" if out else "; with --static"
    if out:
        parser.add_argument("--out", metavar="PATH", help="also write the Markdown report to PATH")
    parser.add_argument("--quick", action="store_true",
                        help=f"only the heavy subset the test compiles (minutes, not ~10){note}")
    parser.add_argument("--jobs", type=int, default=None, help=f"compiles at a time (default: one per CPU){note}")
    parser.add_argument("--part", choices=("all", "attention", "families"), default=None,
                        help="the attention kernels, the other kernel families (kernels/<family>.py), or both "
                        f"(default: all){note}")


if __name__ == "__main__":
    sys.exit(main())

"""The `bertfast` command: `bertfast info`, `bertfast pretrain`, `bertfast export`, `bertfast demo`,
`bertfast static-report`."""

from __future__ import annotations

import argparse
import json
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
    static = sub.add_parser("static-report", help="compile every Triton kernel config for sm_80 and sm_90 "
                            "(no GPU needed) and tabulate registers, spills, shared memory and HGMMA use")
    static.add_argument("--out", metavar="PATH", help="also write the Markdown report to PATH")
    static.add_argument("--quick", action="store_true", help="only the heavy subset the test compiles (minutes, not ~10)")
    static.add_argument("--jobs", type=int, default=None, help="compiles at a time (default: one per CPU)")
    static.add_argument("--part", choices=("all", "attention", "families"), default="all",
                        help="the attention kernels, the other kernel families (kernels/<family>.py), or both")
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
    elif args.command == "static-report":
        import time

        from bertfast import kernel_report

        missing = kernel_report.missing_tools()
        if missing:
            parser.error(f"static-report: {missing}")
        todo, jobs = [], []
        if args.part in ("all", "attention"):
            todo = kernel_report.quick_variants() if args.quick else kernel_report.variants(flags="extremes")
        if args.part in ("all", "families"):
            jobs = kernel_report.quick_launch_jobs() if args.quick else kernel_report.launch_jobs()

        def progress(done, total, row):
            print(f"\r[{done}/{total}] {row.describe()} {row.compile_s:.1f} s   ", end="", file=sys.stderr,
                  flush=True)

        start = time.perf_counter()
        rows = kernel_report.compile_all(todo + jobs, jobs=args.jobs, progress=progress)
        print(file=sys.stderr)
        command = ("bertfast static-report" + (" --quick" if args.quick else "")
                   + (f" --part {args.part}" if args.part != "all" else ""))
        scope = kernel_report.QUICK_SCOPE if args.quick else kernel_report.FULL_SCOPE
        seconds = time.perf_counter() - start
        if todo:
            text = kernel_report.render(rows[:len(todo)], command, seconds, scope, launch_rows=rows[len(todo):])
        else:
            text = kernel_report.render_families(rows, command, seconds, quick=args.quick)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `bertfast` command: `bertfast info`, `bertfast demo`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bertfast", description="Fast BERT-family encoders for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices, compiled parts, and the backends each op can use here")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    demo = sub.add_parser("demo", help="one pretraining step of BERT, ALBERT, RoBERTa and ELECTRA on random data")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seq-len", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "info":
        from bertfast import info as info_mod

        report = info_mod.collect()
        print(json.dumps(report, indent=2, default=str) if args.json else info_mod.render(report))
    elif args.command == "demo":
        from bertfast import demo as demo_mod

        if args.batch < 1 or args.seq_len < 8:
            parser.error("--batch must be >= 1 and --seq-len >= 8")
        demo_mod.run(batch=args.batch, seq_len=args.seq_len, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

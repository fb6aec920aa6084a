"""Command lines of ``bertfast pretrain`` (also ``python -m bertfast.pretrain``, and under
``torchrun --nproc_per_node=N -m bertfast.pretrain``) and ``bertfast export``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertfast.pretrain import recipes

def _defaults():
    from bertfast.pretrain.trainer import RunConfig

    return RunConfig()


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    p.add_argument("--model", choices=recipes.MODELS, default=d.model, help="the model and its objective "
                   "(bert: MLM static + NSP; albert: n-gram MLM + SOP; roberta: dynamic MLM; electra: generator + RTD)")
    p.add_argument("--size", choices=recipes.SIZES, default=d.size, help="tiny trains on a 2-core CPU in minutes")
    p.add_argument("--config", metavar="JSON", help="a JSON object of model config fields that replace the size's "
                   "(transformers' names, e.g. {\"num_hidden_layers\": 4})")
    p.add_argument("--corpus", metavar="PATH", help="a .txt file (blank lines between documents), a .jsonl file "
                   "(one document per line), or a folder of them; default: the Python standard library's docstrings")
    p.add_argument("--text-field", default=d.text_field, help="the .jsonl field holding the text")
    p.add_argument("--tokenizer", metavar="JSON", help="a tokenizer.json to use instead of training one")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="of the tokenizer trained on the corpus")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps}; with --resume: "
                   "the saved run's, or more to extend it)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch per process")
    p.add_argument("--accumulation", type=int, default=d.accumulation, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence, special tokens included")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of --steps), then linear "
                   "decay to 0")
    p.add_argument("--optimizer", choices=("adamw", "lamb"), default=d.optimizer)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip, help="max gradient norm (0: no clipping)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=d.precision,
                   help="auto: bf16 autocast on a GPU that has it, else fp32; fp16 uses loss scaling")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--generator-fraction", type=float, default=d.generator_fraction,
                   help="ELECTRA: generator width as a fraction of the discriminator's")
    p.add_argument("--rtd-weight", type=float, default=d.rtd_weight, help="ELECTRA: weight of the RTD loss")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics records")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state with "
                   "FSDP2 (fully_shard) instead of replicating them with DDP")
    p.add_argument("--out", metavar="DIR", help="the run folder (default: runs/<model>-<size>, or -2, -3, ... if it "
                   "exists)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with its saved settings (--steps may extend it)")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU if any, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no loss plot at the end")


def run_pretrain(args: argparse.Namespace) -> int:
    from bertfast.pretrain.trainer import RunConfig, Trainer

    d = RunConfig()
    cfg = RunConfig(
        model=args.model, size=args.size, config=recipes.read_overrides(args.config), corpus=args.corpus,
        text_field=args.text_field, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        steps=d.steps if args.steps is None else args.steps, batch_size=args.batch_size,
        accumulation=args.accumulation, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
        optimizer=args.optimizer, weight_decay=args.weight_decay, clip=args.clip, precision=args.precision,
        seed=args.seed, generator_fraction=args.generator_fraction, rtd_weight=args.rtd_weight,
        checkpoint_every=args.checkpoint_every, keep=args.keep, log_every=args.log_every, fsdp=args.fsdp)
    if args.resume and args.steps is None:
        cfg.steps = 0  # keep the saved run's
    if not args.resume:
        cfg.check()
    out = args.out or default_out(args.model, args.size, args.resume)
    trainer = Trainer(cfg, out, resume=args.resume, device=args.device, progress=not args.no_progress,
                      plot=not args.no_plot)
    trainer.run()
    return 0


def default_out(model: str, size: str, resume: bool) -> str:
    """runs/<model>-<size>, or the first free runs/<model>-<size>-N so that running the same command
    twice starts a second run instead of refusing (``--resume`` continues runs/<model>-<size>)."""
    base = Path("runs") / f"{model}-{size}"
    if resume or not base.exists():
        return str(base)
    n = 2
    while base.with_name(f"{base.name}-{n}").exists():
        n += 1
    return str(base.with_name(f"{base.name}-{n}"))


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="a pretraining run folder (its --out)")
    p.add_argument("out", metavar="OUT_DIR", help="where to write the transformers folder")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")


def run_export(args: argparse.Namespace) -> int:
    from bertfast.pretrain.export import export

    written = export(args.run, args.out, step=args.step)
    for path, what in written.items():
        print(f"{what}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bertfast.pretrain``: the pretrain command."""
    parser = argparse.ArgumentParser(prog="python -m bertfast.pretrain", description="Pretrain BERT, ALBERT, "
                                     "RoBERTa or ELECTRA; see `bertfast pretrain --help`.")
    add_pretrain_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_pretrain(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:  # the trainer has written a checkpoint and said where
        return 130


if __name__ == "__main__":
    sys.exit(main())

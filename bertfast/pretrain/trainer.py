"""The pretraining loop: data, model, optimizer, precision, processes, checkpoints, what a person sees.

A run lives in one folder (``--out``):
  run.json          the settings (what ``--resume`` and ``bertfast export`` read back)
  tokenizer.json    the tokenizer (trained on the corpus unless ``--tokenizer`` gave one)
  metrics.jsonl     one record per logged step
  checkpoints/      step-NNNNNNNN/: model.safetensors, optimizer.safetensors, rng.safetensors, state.json
  loss.png          the loss curves, summary.txt / summary.json at the end

Every step's loss is the token-weighted mean over all its micro-batches and ranks: each part (MLM
over labelled tokens, NSP/SOP over rows, RTD over real tokens) is weighted by its share of the
step's global count. So N processes with batch b, or accumulation over N micro-batches, train
exactly like one process with batch N x b.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import bertfast
from bertfast.ops.dispatch import record_backends
from bertfast.pretrain import checkpoint, optim, recipes, report
from bertfast.pretrain.corpus import read_corpus
from bertfast.pretrain.data import PretrainingData, tokenize_documents
from bertfast.pretrain.distributed import Distributed
from bertfast.pretrain.tokenizer import kind_for, load_tokenizer, train_tokenizer

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "lamb")


@dataclass
class RunConfig:
    """Every setting of a run; ``run.json`` holds it, so a resumed run continues with the same."""

    model: str = "electra"
    size: str = "tiny"
    config: dict = dataclasses.field(default_factory=dict)  # config field overrides (--config)
    corpus: str | None = None           # None = the standard library's docstrings
    text_field: str = "text"
    tokenizer: str | None = None        # a tokenizer.json; None = train one on the corpus
    vocab_size: int = 8192
    steps: int = 300
    batch_size: int = 32
    accumulation: int = 1
    seq_len: int = 128
    lr: float = 1e-3
    warmup: int | None = None           # warmup steps; None = 10% of steps
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    clip: float = 1.0                   # max gradient norm; 0 = no clipping
    precision: str = "auto"             # auto = bf16 on a GPU that has it, else fp32
    seed: int = 0
    generator_fraction: float = 1 / 3
    rtd_weight: float = 50.0
    checkpoint_every: int = 100
    keep: int = 2
    log_every: int = 1
    fsdp: bool = False

    def check(self) -> None:
        recipes.check_model(self.model, self.size)
        positive = ("vocab_size", "steps", "batch_size", "accumulation", "seq_len", "checkpoint_every", "keep",
                    "log_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be a positive int, got {value!r}")
        if self.seq_len < 8:
            raise ValueError(f"--seq-len: must be >= 8, got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr: must be positive, got {self.lr}")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"--warmup: must be in [0, --steps={self.steps}], got {self.warmup}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.clip >= 0:
            raise ValueError(f"--clip: must be >= 0, got {self.clip}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay: must be >= 0, got {self.weight_decay}")
        if not 0 < self.generator_fraction <= 1:
            raise ValueError(f"--generator-fraction: must be in (0, 1], got {self.generator_fraction}")

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup is None else self.warmup

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class Trainer:
    """One run: ``Trainer(cfg, out).run()``; ``resume=True`` continues the run in ``out``."""

    def __init__(self, cfg: RunConfig, out: str | os.PathLike, *, resume: bool = False, device: str = "auto",
                 progress: bool = True, plot: bool = True, echo=print):
        self.out = Path(out)
        self.dist = Distributed.start(device)
        self.echo = echo if self.dist.is_main else (lambda *a, **k: None)
        self.progress, self.plot = progress, plot
        run_file = self.out / "run.json"
        if resume:
            if not run_file.is_file():
                raise FileNotFoundError(f"--resume: {self.out} holds no run.json; nothing to resume")
            saved = json.loads(run_file.read_text())
            steps = cfg.steps
            cfg = RunConfig.from_dict(saved["run"])
            if steps > cfg.steps:  # --steps extends the run: same warmup, the decay re-planned to the new end
                cfg.warmup, cfg.steps = cfg.warmup_steps, steps
        elif run_file.exists() and checkpoint.latest_checkpoint(self.out) is not None:
            raise FileExistsError(f"--out: {self.out} already holds a run with checkpoints; pass --resume to "
                                  "continue it, or choose another folder")
        cfg.check()
        self.cfg = cfg
        self.precision = resolve_precision(cfg.precision, self.dist.device)
        if self.precision == "bf16" and self.dist.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision: bf16 asked for, but this GPU does not support it")
        self._setup(resume)

    # --- setup ----------------------------------------------------------------------------------
    def _setup(self, resume: bool) -> None:
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoint.clean_temporary(self.out)
        dist.barrier()
        start = time.perf_counter()
        self.corpus = read_corpus(cfg.corpus, text_field=cfg.text_field)
        self.echo(f"corpus: {self.corpus.source}: {len(self.corpus.documents):,} documents, "
                  f"{self.corpus.num_sentences:,} sentences, {self.corpus.num_characters:,} characters"
                  + (f"; skipped {self.corpus.skipped}" if self.corpus.skipped else ""))
        tok_file = self.out / "tokenizer.json"
        if dist.is_main and not (resume and tok_file.exists()):  # a new run never reuses an old folder's tokenizer
            if cfg.tokenizer is not None:
                vocab = load_tokenizer(cfg.tokenizer)
                how = f"loaded {cfg.tokenizer}"
            else:
                vocab = train_tokenizer(kind_for(cfg.model), self.corpus.texts(), cfg.vocab_size,
                                        lowercase=cfg.model != "roberta")  # RoBERTa's byte-level BPE is cased
                how = "trained on the corpus"
            vocab.save(tok_file)
            self.echo(f"tokenizer: {vocab.kind}, {vocab.vocab_size:,} tokens, {how} -> {tok_file}")
        dist.barrier()
        self.vocab = load_tokenizer(tok_file)
        documents = tokenize_documents(self.corpus.documents, self.vocab)
        objective = recipes.OBJECTIVES[cfg.model]
        self.data = PretrainingData(documents, self.vocab, objective, seq_len=cfg.seq_len, seed=cfg.seed,
                                    batch_size=cfg.batch_size, accumulation=cfg.accumulation,
                                    world_size=dist.world_size)
        self.echo(f"data: {self.data.num_examples:,} examples of <= {cfg.seq_len} tokens "
                  f"({objective.pairs or 'full sentences'}, {objective.masking} masking), "
                  f"{self.data.steps_in_epoch(0):,} steps per epoch; ready in {time.perf_counter() - start:.1f} s")

        self.model_config = recipes.model_config(cfg.model, cfg.size, vocab_size=self.vocab.vocab_size,
                                                 pad_token_id=self.vocab.pad_token_id, seq_len=cfg.seq_len,
                                                 overrides=cfg.config)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = recipes.build_model(cfg.model, self.model_config, generator_fraction=cfg.generator_fraction,
                                    rtd_weight=cfg.rtd_weight).to(dist.device)
        self.step = 0
        if dist.is_main:
            self._write_run_json()

        if cfg.fsdp:
            self.model = _fully_shard(model, cfg.model)
        elif dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        else:
            self.model = model
        self.optimizer = optim.make_optimizer(cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = optim.warmup_linear_decay(self.optimizer, cfg.warmup_steps, cfg.steps)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.precision == "fp16")
        torch.manual_seed(cfg.seed + 1 + dist.rank)  # dropout and sampling differ per rank
        latest = checkpoint.latest_checkpoint(self.out) if resume else None
        if latest is not None:
            self._load(latest)
        self.metrics = report.MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if resume else None) \
            if dist.is_main else None

    def _write_run_json(self) -> None:
        info = {"run": dataclasses.asdict(self.cfg), "model_config": self.model_config.to_dict(),
                "bertfast": bertfast.__version__, "torch": torch.__version__, "python": platform.python_version()}
        tmp = self.out / "run.json.tmp"
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
        os.replace(tmp, self.out / "run.json")

    # --- checkpoints ---------------------------------------------------------------------------
    def _state_dicts(self):
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(self.model, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _unwrap(self.model).state_dict(), self.optimizer.state_dict()

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank's RNG goes in)."""
        model_state, optim_state = self._state_dicts()
        rngs = self.dist.all_gather_objects(checkpoint.rng_state())
        path = None
        if self.dist.is_main:
            flat, meta = checkpoint.flatten_optimizer_state(optim_state)
            tensors = {"model": model_state, "optimizer": flat,
                       "rng": {f"rank{r}.{k}": v for r, state in enumerate(rngs) for k, v in state.items()}}
            state = {"step": self.step, "world_size": self.dist.world_size, "optimizer": meta,
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
            path = checkpoint.save_checkpoint(self.out, self.step, tensors, state, keep=self.cfg.keep)
            self.metrics.sync()
        self.dist.barrier()
        return path

    def _load(self, path: Path) -> None:
        ckpt = checkpoint.load_checkpoint(path)
        state = ckpt.state
        optim_state = checkpoint.unflatten_optimizer_state(ckpt.tensors["optimizer"], state["optimizer"])
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=ckpt.tensors["model"],
                           optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True))
        else:
            _unwrap(self.model).load_state_dict(ckpt.tensors["model"])
            self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scheduler.lr_lambdas[0].total_steps != self.cfg.steps:  # extended: decay to the new end
            for group, base, schedule in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                             self.scheduler.lr_lambdas):
                schedule.total_steps = self.cfg.steps
                group["lr"] = base * schedule(self.scheduler.last_epoch)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler.load_state_dict(state["scaler"])
        if state["world_size"] == self.dist.world_size:
            prefix = f"rank{self.dist.rank}."
            checkpoint.set_rng_state({k[len(prefix):]: v for k, v in ckpt.tensors["rng"].items()
                                      if k.startswith(prefix)})
        else:
            self.echo(f"resume: the checkpoint was written by {state['world_size']} processes, this run has "
                      f"{self.dist.world_size}: data order is kept, dropout/sampling draws are not")
        self.step = state["step"]
        self.echo(f"resumed from {path} (step {self.step})")

    # --- the loop ------------------------------------------------------------------------------
    def train_step(self, log: bool) -> dict[str, float] | None:
        """One optimizer step; on logged steps, returns the step's global losses."""
        cfg, dist, device = self.cfg, self.dist, self.dist.device
        names, P = self.parts, len(self.parts)
        micro = self.data.micro_batches(self.step, dist.rank)
        counts = torch.stack([recipes.part_counts(b, names) for b in micro])
        # The step's global count per part (all micro-batches, all ranks): each part's mean is
        # weighted by its share, and DDP's gradient mean over ranks is undone by x world_size.
        totals = dist.all_reduce_sum(counts.sum(0).to(device))
        shares = counts[:, :P].to(device) / totals[:P].clamp_min(1.0)
        logged = torch.zeros(P, dtype=torch.float64, device=device)
        for j, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = j == len(micro) - 1 or not dist.enabled or cfg.fsdp
            with (contextlib.nullcontext() if sync else self.model.no_sync()), _autocast(self.precision, device):
                parts = recipes.loss_parts(cfg.model, self.model, batch)
                values = torch.stack([parts[p].float() for p in names])
                objective = (values * shares[j].float() * self.weights).sum() * dist.world_size
            self.scaler.scale(objective).backward()
            logged += values.detach().double() * shares[j]
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
        lr = self.scheduler.get_last_lr()[0]
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is None or self.scaler.get_scale() >= scale:  # fp16: no schedule step when the step was skipped
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += totals[P]
        if not log:
            return None
        dist.all_reduce_sum(logged)
        record = {n: float(v) for n, v in zip(names, logged.tolist())}
        record = {"loss": float((logged * self.weights.double()).sum()), **record, "lr": lr,
                  "grad_norm": float(grad_norm)}
        if self.precision == "fp16":
            record["loss_scale"] = float(self.scaler.get_scale())
        elif not math.isfinite(record["loss"]):  # fp16's scaler skips such steps; elsewhere it is divergence
            latest = checkpoint.latest_checkpoint(self.out)
            raise FloatingPointError(f"step {self.step}: the loss is {record['loss']} ({record}); stopped. The last "
                                     f"checkpoint ({latest or 'none yet'}) is intact: lower --lr, or raise --warmup")
        return record

    def run(self) -> report.Summary | None:
        """Train to ``steps``, checkpointing on the way; returns the summary (on rank 0)."""
        cfg, dist = self.cfg, self.dist
        self.parts = recipes.parts_of(cfg.model)
        weights = recipes.part_weights(cfg.model, cfg.rtd_weight)
        self.weights = torch.tensor([weights[p] for p in self.parts], device=dist.device)
        self.tokens_seen = torch.zeros((), dtype=torch.float64, device=dist.device)
        self.model.train()
        if self.step >= cfg.steps:
            self.echo(f"nothing to do: the run is at step {self.step} of {cfg.steps}")
        bar = None
        if dist.is_main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                       desc=f"{cfg.model}-{cfg.size}")
        backends: dict[str, set] = {}
        start, first_step = time.perf_counter(), self.step
        # Ctrl-C (SIGINT, which torchrun forwards to every rank) ends the run after the current step,
        # with a checkpoint: never in the middle of a backward or a checkpoint write. A second one
        # interrupts at once.
        stop, previous = [False], None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if stop[0]:
                    raise KeyboardInterrupt
                stop[0] = True
            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            while self.step < cfg.steps:
                log = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
                if self.step == first_step:  # which backend ran each op (the same every step)
                    with record_backends() as trace:
                        record = self.train_step(log)
                    for op, backend in trace:
                        backends.setdefault(op, set()).add(backend)
                else:
                    record = self.train_step(log)
                if record is not None and dist.is_main:
                    elapsed = time.perf_counter() - start
                    tokens = int(self.tokens_seen)
                    record = {"step": self.step, **record, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                              "time_s": elapsed}
                    self.metrics.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                        refresh=False)
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
                if self._interrupted(stop):
                    path = self.save() if self.step % cfg.checkpoint_every else checkpoint.latest_checkpoint(self.out)
                    self.echo(f"\ninterrupted: checkpoint at step {self.step} in {path}; continue with --resume")
                    raise KeyboardInterrupt
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if bar is not None:
                bar.close()
        summary = self._finish(backends, int(self.tokens_seen), time.perf_counter() - start)
        dist.stop()
        return summary

    def _interrupted(self, stop: list) -> bool:
        """Whether any rank got Ctrl-C (all ranks must agree, to save the same step together)."""
        if not self.dist.enabled:
            return stop[0]
        flag = torch.tensor(float(stop[0]), device=self.dist.device)
        return bool(self.dist.all_reduce_sum(flag) > 0)

    def _finish(self, backends, tokens: int, seconds: float):
        if not self.dist.is_main:
            return None
        self.metrics.close()
        records = report.read_metrics(self.out / "metrics.jsonl")
        cfg = self.cfg
        extra = {"out": str(self.out), "corpus": self.corpus.source, "corpus_skipped": self.corpus.skipped,
                 "examples": self.data.num_examples}
        latest = checkpoint.latest_checkpoint(self.out)
        if latest is not None:
            extra["checkpoint"] = str(latest)
        summary = report.summarize(records, model=f"{cfg.model}-{cfg.size}", tokens=tokens, seconds=seconds,
                                   backends={k: sorted(v) for k, v in backends.items()}, device=str(self.dist.device),
                                   precision=self.precision, world_size=self.dist.world_size, extra=extra)
        if self.plot and records:
            png = report.plot_losses(records, self.out / "loss.png", title=f"{cfg.model}-{cfg.size} pretraining")
            summary.extra["plot"] = str(png)
        (self.out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2, default=str))
        text = summary.render()
        (self.out / "summary.txt").write_text(text + "\n")
        self.echo(text)
        return summary


def _fully_shard(model: nn.Module, name: str) -> nn.Module:
    """FSDP2: shard each encoder layer, then the rest. ALBERT's one shared layer and ELECTRA's shared
    embedding stay in the root unit, so a shared parameter belongs to exactly one unit."""
    from torch.distributed.fsdp import fully_shard

    if name in ("bert", "roberta"):
        encoder = (model.bert if name == "bert" else model.roberta).encoder
        for layer in encoder.layer:
            fully_shard(layer)
    elif name == "electra":
        for part in (model.generator.electra, model.discriminator.electra):
            for layer in part.encoder.layer:
                fully_shard(layer)
    fully_shard(model)
    return model

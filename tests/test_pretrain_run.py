"""End-to-end pretraining: the four objectives learn, a SIGKILLed run resumes exactly, two gloo
processes train like one with the combined batch, exports load in transformers with the same
outputs, and bad corpora / tokenizers / folders get clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bertfast.pretrain import checkpoint
from bertfast.pretrain.command import main as pretrain_main
from bertfast.pretrain.corpus import read_corpus
from bertfast.pretrain.export import export, load_run_model
from bertfast.pretrain.recipes import MODELS
from bertfast.pretrain.report import read_metrics
from bertfast.pretrain.tokenizer import train_tokenizer
from bertfast.pretrain.trainer import RunConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A WordPiece and a byte-level BPE of 2000 tokens trained once on the default corpus."""
    folder = tmp_path_factory.mktemp("tokenizers")
    corpus = read_corpus(None)
    paths = {}
    for kind in ("wordpiece", "bpe"):
        paths[kind] = folder / f"{kind}.json"
        train_tokenizer(kind, corpus.texts(), 2000, lowercase=kind == "wordpiece").save(paths[kind])
    return paths


def tokenizer_for(tokenizers, model):
    return str(tokenizers["bpe" if model == "roberta" else "wordpiece"])


def train(out, tokenizers, model="electra", **kw):
    settings = dict(model=model, size="tiny", tokenizer=tokenizer_for(tokenizers, model), batch_size=8, seq_len=64,
                    steps=4, checkpoint_every=1000)
    settings.update(kw)
    trainer = Trainer(RunConfig(**settings), out, progress=False, plot=False, echo=lambda *a, **k: None)
    return trainer.run()


def cli_args(out, tokenizers, model, *extra):
    return ["--model", model, "--size", "tiny", "--tokenizer", tokenizer_for(tokenizers, model), "--batch-size", "4",
            "--seq-len", "32", "--out", str(out), "--no-progress", "--no-plot", *map(str, extra)]


def subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.parametrize("model", MODELS)
def test_tiny_pretraining_lowers_the_loss(model, tokenizers, tmp_path):
    """A few hundred steps at most on the standard library's docstrings: a clear drop, not a value."""
    summary = train(tmp_path / model, tokenizers, model, steps=120)
    first, final = summary.first_losses, summary.final_losses
    assert final["mlm_loss"] < first["mlm_loss"] - 0.7, (first, final)  # ln(2000) = 7.6 at the start
    assert final["loss"] < 0.9 * first["loss"], (first, final)
    if model == "electra":
        assert final["rtd_loss"] < first["rtd_loss"] - 0.1, (first, final)
    records = read_metrics(tmp_path / model / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 121))
    assert summary.backends, "the summary names the backends that ran"


def test_sigkill_then_resume_continues_exactly(tokenizers, tmp_path):
    """Kill a run (SIGKILL) after a checkpoint, resume it: every logged loss equals an uninterrupted
    run's, including the steps the killed run logged past its checkpoint."""
    steps, every = 60, 10
    args = cli_args(tmp_path / "killed", tokenizers, "electra", "--steps", steps, "--checkpoint-every", every)
    cmd = [sys.executable, "-m", "bertfast.pretrain", *args]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "killed" / "checkpoints" / f"step-{every:08d}"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-2000:]}"
    killed_at = checkpoint.latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < steps

    resumed = subprocess.run([sys.executable, "-m", "bertfast.pretrain", "--resume", "--out",
                              str(tmp_path / "killed"), "--no-progress", "--no-plot"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    straight = subprocess.run([sys.executable, "-m", "bertfast.pretrain",
                               *cli_args(tmp_path / "straight", tokenizers, "electra", "--steps", steps,
                                         "--checkpoint-every", every)],
                              env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    b = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "mlm_loss", "rtd_loss", "lr", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    wa = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / "killed")).tensors["model"]
    wb = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / "straight")).tensors["model"]
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model,sharding", [("albert", "ddp"), ("bert", "ddp"), ("bert", "fsdp")])
def test_two_gloo_processes_train_like_one_with_the_combined_batch(model, sharding, tokenizers, tmp_path):
    """torchrun, 2 processes x batch 4 (DDP or FSDP2, gloo) == 1 process x batch 8, parameters after
    4 steps. Dropout is off: its masks depend on a row's place in its batch."""
    overrides = tmp_path / "config.json"
    overrides.write_text(json.dumps({**NO_DROPOUT, **({"classifier_dropout_prob": 0.0} if model == "albert" else {})}))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bertfast.pretrain", *cli_args(out, tokenizers, model, "--steps", 4, "--config", overrides),
           *(["--fsdp"] if sharding == "fsdp" else [])]
    done = subprocess.run(cmd, env=dict(subprocess_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size: 2" in done.stdout
    train(tmp_path / "one", tokenizers, model, batch_size=8, seq_len=32, steps=4,
          config=json.loads(overrides.read_text()))
    a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out)).tensors["model"]
    b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / "one")).tensors["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
    la = read_metrics(out / "metrics.jsonl")
    lb = read_metrics(tmp_path / "one" / "metrics.jsonl")
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_accumulation_equals_the_combined_batch(tokenizers, tmp_path):
    config = {**NO_DROPOUT, "classifier_dropout_prob": 0.0}
    train(tmp_path / "acc", tokenizers, "albert", batch_size=4, accumulation=2, steps=3, config=config)
    train(tmp_path / "one", tokenizers, "albert", batch_size=8, steps=3, config=config)
    a = load_run_model(tmp_path / "acc")[0].state_dict()
    b = load_run_model(tmp_path / "one")[0].state_dict()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)


@pytest.mark.parametrize("model", MODELS)
def test_export_loads_in_transformers_with_the_same_outputs(model, tokenizers, tmp_path):
    transformers = pytest.importorskip("transformers")
    train(tmp_path / "run", tokenizers, model, steps=2)
    written = export(tmp_path / "run", tmp_path / "hf")
    ours, _, _ = load_run_model(tmp_path / "run")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = tok(["Return the sum of two numbers.", "Open the file and read it."], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, 0] == tok.cls_token_id).all()
    hf_base = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    encoder = {"bert": lambda m: m.bert, "albert": lambda m: m.albert, "roberta": lambda m: m.roberta,
               "electra": lambda m: m.discriminator.electra}[model](ours)
    with torch.no_grad():
        expected = encoder(ids, mask).last_hidden_state
        got = hf_base(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
    if model == "electra":
        assert str(tmp_path / "hf" / "generator") in written
        gen = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf" / "generator").eval()
        with torch.no_grad():
            logits = gen(input_ids=ids, attention_mask=mask).logits
            hidden = ours.generator.electra(ids, mask).last_hidden_state
            torch.testing.assert_close(logits[real], ours.generator.mlm_logits(hidden)[real], rtol=1e-4, atol=1e-4)


def test_bad_corpora_and_tokenizers_get_clear_errors(tokenizers, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        pretrain_main(["--corpus", str(empty), "--out", str(tmp_path / "a"), "--no-progress"])
    assert e.value.code == 2 and "corpus" in capsys.readouterr().err

    no_mask = tmp_path / "no_mask.json"
    spec = json.loads(Path(tokenizers["wordpiece"]).read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "[MASK]"]
    spec["model"]["vocab"].pop("[MASK]")
    no_mask.write_text(json.dumps(spec))
    with pytest.raises(SystemExit):
        pretrain_main(["--tokenizer", str(no_mask), "--out", str(tmp_path / "b"), "--no-progress"])
    assert "--tokenizer" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        pretrain_main(["--batch-size", "0", "--out", str(tmp_path / "c"), "--no-progress"])
    assert "--batch-size" in capsys.readouterr().err

    train(tmp_path / "d", tokenizers, steps=1)
    with pytest.raises(SystemExit):
        pretrain_main(["--out", str(tmp_path / "d"), "--no-progress"])
    assert "--resume" in capsys.readouterr().err


def test_undecodable_lines_are_counted_and_skipped(tokenizers, tmp_path):
    corpus = tmp_path / "corpus.txt"
    good = "\n\n".join(f"Document {i} says that the value is returned. It is then printed." for i in range(400))
    corpus.write_bytes(good.encode() + b"\n\nbad \xff\xfe bytes here.\n\n" + good.encode())
    summary = train(tmp_path / "run", tokenizers, corpus=str(corpus), steps=2, batch_size=2, seq_len=32)
    assert summary.extra["corpus_skipped"] == {"undecodable line": 1}


@pytest.mark.parametrize("precision,optimizer", [("bf16", "adamw"), ("fp16", "lamb")])
def test_mixed_precision_and_lamb_steps_are_finite(precision, optimizer, tokenizers, tmp_path):
    train(tmp_path / "run", tokenizers, steps=3, precision=precision, optimizer=optimizer)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    if precision == "fp16":
        assert all("loss_scale" in r for r in records)


def test_extending_a_finished_run_decays_to_the_new_end(tokenizers, tmp_path):
    train(tmp_path / "run", tokenizers, steps=4, warmup=1)
    trainer = Trainer(RunConfig(steps=8), tmp_path / "run", resume=True, progress=False, plot=False,
                      echo=lambda *a, **k: None)
    trainer.run()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    # steps 5..8 follow the re-planned schedule: warmup 1 kept, linear decay to 0 after step 8
    assert [r["lr"] for r in records[4:]] == pytest.approx([1e-3 * (8 - s) / 7 for s in range(4, 8)], rel=1e-12)


def test_bertfast_command_pretrains_and_exports(tokenizers, tmp_path, capsys):
    from bertfast import cli

    run = tmp_path / "run"
    assert cli.main(["pretrain", *cli_args(run, tokenizers, "albert", "--steps", 2)]) == 0
    assert "albert-tiny" in capsys.readouterr().out
    assert cli.main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert "AlbertForPreTraining" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["export", str(run), str(tmp_path / "hf")])  # not an empty folder any more
    assert "not empty" in capsys.readouterr().err


def test_ctrl_c_ends_the_step_and_writes_a_checkpoint(tokenizers, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bertfast.pretrain", *cli_args(out, tokenizers, "roberta", "--steps", 400,
                                                                   "--checkpoint-every", 1000)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while (not metrics.exists() or metrics.stat().st_size < 2000) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    saved = checkpoint.latest_checkpoint(out)
    assert saved is not None and "interrupted: checkpoint at step" in stdout
    step = int(saved.name.split("-")[1])
    assert 0 < step < 400 and [r["step"] for r in read_metrics(metrics)] == list(range(1, step + 1))


def test_a_diverging_loss_stops_the_run(tokenizers, tmp_path):
    with pytest.raises(FloatingPointError, match=r"step \d: the loss is (nan|inf)"):
        train(tmp_path / "run", tokenizers, steps=5, lr=1e20, warmup=0, clip=0.0)

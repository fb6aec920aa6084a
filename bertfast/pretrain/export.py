"""``bertfast export RUN_DIR OUT_DIR``: a pretraining checkpoint as a transformers folder
(``save_pretrained`` model + tokenizer) that ``transformers.AutoModel.from_pretrained`` loads offline.

BERT -> BertForPreTraining, ALBERT -> AlbertForPreTraining, RoBERTa -> RobertaForMaskedLM, ELECTRA ->
the discriminator (ElectraForPreTraining) in OUT_DIR and the generator (ElectraForMaskedLM) in
OUT_DIR/generator, as Google's ELECTRA releases ship them.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from bertfast.pretrain import checkpoint, recipes
from bertfast.pretrain.tokenizer import load_tokenizer, to_transformers


def load_run_model(run_dir: str | Path, step: int | None = None) -> tuple[nn.Module, dict, Path]:
    """The pretraining model of a run folder with the weights of checkpoint ``step`` (None: the
    latest); returns (model, run.json contents, checkpoint path)."""
    run_dir = Path(run_dir)
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise FileNotFoundError(f"run: {run_dir} holds no run.json (not a `bertfast pretrain` folder)")
    info = json.loads(run_file.read_text())
    if step is None:
        path = checkpoint.latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"run: {run_dir} has no complete checkpoint yet")
    else:
        path = next((p for p in checkpoint.list_checkpoints(run_dir) if p.name == f"step-{step:08d}"), None)
        if path is None:
            have = [p.name for p in checkpoint.list_checkpoints(run_dir)]
            raise FileNotFoundError(f"--step: {run_dir} has no checkpoint of step {step}; it has {have}")
    run = info["run"]
    config = recipes.config_class(run["model"]).from_dict(info["model_config"])
    model = recipes.build_model(run["model"], config, generator_fraction=run["generator_fraction"],
                                rtd_weight=run["rtd_weight"])
    model.load_state_dict(checkpoint.load_checkpoint(path).tensors["model"])
    return model.eval(), info, path


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> dict[str, str]:
    """Write the transformers folder(s); returns {folder: what it holds}."""
    import bertfast

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"out: {out_dir} exists and is not empty; choose a new folder")
    model, info, path = load_run_model(run_dir, step)
    vocab = load_tokenizer(Path(run_dir) / "tokenizer.json")
    tokenizer = to_transformers(vocab, model_max_length=info["run"]["seq_len"])
    written = {}
    for sub, part in recipes.hf_parts(info["run"]["model"], model).items():
        folder = out_dir / sub if sub else out_dir
        hf = bertfast.to_hf(part)
        hf.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        written[str(folder)] = f"{type(hf).__name__} + tokenizer from {path.name}"
    return written

"""bertfast.pretrain.checkpoint: round trips, atomicity (in process and under SIGKILL), keep,
optimizer and RNG state, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors
import torch

from bertfast.pretrain import checkpoint as ckpt
from bertfast.pretrain.checkpoint import (
    clean_temporary,
    flatten_optimizer_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optimizer_state,
)


def _steps(run_dir):
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)]


def _tmp_entries(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob(".tmp-*"))


def _tied_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7))
    model[1].weight = model[0].weight  # tied: both keys in state_dict, one storage
    return model


def _tensors():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    model = _tied_model().state_dict()
    return {
        "model": model,
        "misc": {
            "f32": torch.randn(3, 5, generator=torch.Generator().manual_seed(1)),
            "bf16": torch.tensor([0.1, -3.5, 1e30, float("inf")], dtype=torch.bfloat16),
            "f16": torch.tensor([65504.0, 6e-8, float("nan")], dtype=torch.float16),
            "i64": torch.tensor([-(2 ** 62), 0, 2 ** 62 + 1], dtype=torch.int64),
            "u8": torch.arange(256, dtype=torch.uint8),
            "scalar": torch.tensor(3.0),
            "empty": torch.empty(0, 3),
            "base": base,
            "transposed": base.t(),            # non-contiguous view of base
            "strided": base[:, ::2],           # non-contiguous, overlaps base
            "row": base[1],                    # contiguous slice, overlaps base
        },
        "empty_group": {},
    }


def _equal(a, b):
    """Same dtype, shape and bytes (NaN-safe, bit-exact)."""
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def test_round_trip(tmp_path):
    tensors = _tensors()
    state = {"lr": 0.1 + 0.2, "tiny": 5e-324, "big": 2 ** 70, "neg": -0.0, "none": None, "flag": True,
             "nested": {"a": [1, 2.5, None, "s", {"b": [[], {}]}], "text": "ünïcode\n\"q\""}}
    path = save_checkpoint(tmp_path, 7, tensors, state)
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert latest_checkpoint(tmp_path) == path and list_checkpoints(tmp_path) == [path]

    loaded = load_checkpoint(path)
    assert loaded.path == path and loaded.step == 7
    assert loaded.state == state and loaded.state["lr"] == 0.1 + 0.2 != 0.3
    assert json.dumps(loaded.state["neg"]) == "-0.0"
    assert list(loaded.tensors) == list(tensors)
    for group, items in tensors.items():
        assert list(loaded.tensors[group]) == list(items)  # order kept
        for key, t in items.items():
            got = loaded.tensors[group][key]
            assert got.device.type == "cpu" and not got.requires_grad
            assert _equal(got, t.detach()), (group, key)

    # The tied weight is stored once and comes back under both keys as one tensor.
    model = loaded.tensors["model"]
    assert model["1.weight"] is model["0.weight"]
    with safetensors.safe_open(path / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == ["0.weight", "1.bias"]
    # and it loads strictly into a fresh tied model
    fresh = _tied_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(model, strict=True)
    assert torch.equal(fresh[1].weight, tensors["model"]["1.weight"])

    manifest = json.loads((path / "state.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "misc.safetensors", "empty_group.safetensors"}
    for name, info in manifest["files"].items():
        assert (path / name).stat().st_size == info["bytes"]


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, 1, {"a": {"x": torch.ones(3)}, "b": {"y": torch.zeros(2)}}, {"s": 1})
    real_write = ckpt._write_bytes
    calls = []

    def failing_write(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", failing_write)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, {"a": {"x": torch.ones(3) * 2}, "b": {"y": torch.ones(2)}}, {"s": 2})
    assert calls == ["a.safetensors", "b.safetensors"]
    assert latest_checkpoint(tmp_path) == first
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()
    # The exception path removed its own temporary directory.
    assert _tmp_entries(tmp_path) == []
    assert load_checkpoint(first).state == {"s": 1}

    # A leftover temporary directory (a killed save), even a complete-looking one, is never read,
    # and clean_temporary removes it.
    leftover = tmp_path / "checkpoints" / ".tmp-step-00000003-999-abcdef01"
    shutil.copytree(first, leftover)
    assert latest_checkpoint(tmp_path) == first
    assert clean_temporary(tmp_path) == 1
    assert _tmp_entries(tmp_path) == [] and latest_checkpoint(tmp_path) == first


def test_damaged_files(tmp_path):
    one = save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(64)}}, {"k": 1})
    two = save_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(64) * 2}}, {"k": 2})
    assert latest_checkpoint(tmp_path) == two

    # Truncated after the fact: size mismatch, skipped by latest, named by load.
    file = two / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    assert latest_checkpoint(tmp_path) == one and list_checkpoints(tmp_path) == [one]
    with pytest.raises(ValueError, match=r"checkpoint .*step-00000002: model\.safetensors is corrupt \(.*bytes"):
        load_checkpoint(two)

    # Same size, one byte changed: only the sha256 check sees it.
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    file.write_bytes(bytes(flipped))
    assert latest_checkpoint(tmp_path) == two
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt \(sha256"):
        load_checkpoint(two)

    # A truncated state.json: skipped, and load names it.
    file.write_bytes(data)
    state_file = two / "state.json"
    state_file.write_bytes(state_file.read_bytes()[:-5])
    assert latest_checkpoint(tmp_path) == one
    with pytest.raises(ValueError, match=r"state\.json is corrupt"):
        load_checkpoint(two)

    # A missing data file.
    (one / "model.safetensors").unlink()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt \(missing\)"):
        load_checkpoint(one)


def test_keep_and_resave(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, {"m": {"w": torch.full((2,), float(step))}}, {"step": step}, keep=2)
    assert _steps(tmp_path) == [40, 50]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000040", "step-00000050"]

    # Re-saving a step (after a resume) replaces it.
    path = save_checkpoint(tmp_path, 50, {"m": {"w": torch.full((3,), -1.0)}}, {"step": 50, "again": True}, keep=2)
    assert _steps(tmp_path) == [40, 50] and _tmp_entries(tmp_path) == []
    again = load_checkpoint(path)
    assert again.state == {"step": 50, "again": True} and torch.equal(again.tensors["m"]["w"], torch.full((3,), -1.0))

    # Only older steps are pruned; a newer one is left alone.
    save_checkpoint(tmp_path, 45, {"m": {}}, {}, keep=2)
    assert _steps(tmp_path) == [40, 45, 50]
    save_checkpoint(tmp_path, 60, {"m": {}}, {}, keep=1)
    assert _steps(tmp_path) == [60]


_CRASH_SCRIPT = textwrap.dedent("""
    import importlib.util, sys, time
    import torch
    # Load the module from its file: importing the bertfast package would cost seconds.
    spec = importlib.util.spec_from_file_location("checkpoint", sys.argv[1])
    ckpt = sys.modules["checkpoint"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ckpt)
    run_dir, marker = sys.argv[2], sys.argv[3]
    ckpt.save_checkpoint(run_dir, 1, {"a": {"x": torch.arange(10.0)}, "b": {"y": torch.ones(4)}}, {"step": 1})
    real_write = ckpt._write_bytes
    written = []

    def write_then_block(path, data):
        real_write(path, data)
        written.append(path)
        if len(written) == 1:  # step 2's first file is on disk: signal, then hang until killed
            open(marker, "w").close()
            time.sleep(600)

    ckpt._write_bytes = write_then_block
    ckpt.save_checkpoint(run_dir, 2, {"a": {"x": torch.zeros(10)}, "b": {"y": torch.zeros(4)}}, {"step": 2})
""")


def test_sigkill_mid_save(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_SCRIPT, ckpt.__file__, str(run_dir), str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the saving process exited early:\n{proc.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("the saving process never reached the middle of step 2")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    leftovers = _tmp_entries(run_dir)
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-00000002-")
    assert (run_dir / "checkpoints" / leftovers[0] / "a.safetensors").exists()  # half a checkpoint
    latest = latest_checkpoint(run_dir)
    assert latest == run_dir / "checkpoints" / "step-00000001"
    loaded = load_checkpoint(latest)
    assert loaded.step == 1 and loaded.state == {"step": 1}
    assert torch.equal(loaded.tensors["a"]["x"], torch.arange(10.0))
    assert clean_temporary(run_dir) == 1 and _tmp_entries(run_dir) == []
    assert clean_temporary(run_dir) == 0


def _optimizer_classes():
    try:
        from bertfast.pretrain import optim
    except ImportError as e:
        lamb = pytest.param(None, marks=pytest.mark.skip(reason=f"bertfast.pretrain.optim not importable: {e}"))
    else:
        cls = getattr(optim, "Lamb", None)
        lamb = cls if cls is not None else pytest.param(
            None, marks=pytest.mark.skip(reason="bertfast.pretrain.optim has no Lamb yet"))
    return [torch.optim.AdamW, lamb]


def _train(model, opt, steps, start):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(5, 6, generator=g)
        y = torch.randn(5, 3, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _make(opt_cls):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    if opt_cls is torch.optim.AdamW:
        return model, opt_cls(groups, lr=1e-2, betas=(0.8, 0.95))
    return model, opt_cls(groups, lr=1e-2)


@pytest.mark.parametrize("opt_cls", _optimizer_classes())
def test_optimizer_resume_is_exact(tmp_path, opt_cls):
    ref_model, ref_opt = _make(opt_cls)
    _train(ref_model, ref_opt, 6, 0)

    model, opt = _make(opt_cls)
    _train(model, opt, 3, 0)
    flat, meta = flatten_optimizer_state(opt.state_dict())
    if opt_cls is torch.optim.AdamW:
        assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(flat)
        assert torch.is_tensor(opt.state_dict()["state"][0]["step"])
    path = save_checkpoint(tmp_path, 3, {"model": model.state_dict(), "optimizer": flat}, {"optimizer": meta})
    del model, opt

    loaded = load_checkpoint(path)
    model, opt = _make(opt_cls)
    model.load_state_dict(loaded.tensors["model"])
    opt.load_state_dict(unflatten_optimizer_state(loaded.tensors["optimizer"], loaded.state["optimizer"]))
    if opt_cls is torch.optim.AdamW:
        assert opt.param_groups[0]["betas"] == (0.8, 0.95) and isinstance(opt.param_groups[0]["betas"], tuple)
    _train(model, opt, 3, 3)

    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    ref_state, state = ref_opt.state_dict(), opt.state_dict()
    for index, values in ref_state["state"].items():
        for key, v in values.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state["state"][index][key])), (index, key)
    assert ref_state["param_groups"] == state["param_groups"]


def test_optimizer_flatten_general_values():
    sd = {"state": {0: {"step": 4, "buf": torch.ones(2), "ratio": (1.5, None)}, 2: {}},
          "param_groups": [{"params": [0, 2], "lr": torch.tensor(0.01), "betas": (0.9, 0.999), "foreach": None,
                            "nested": [(1, 2), {"x": (3,)}]}]}
    flat, meta = flatten_optimizer_state(sd)
    assert set(flat) == {"state.0.buf", "param_groups.0.lr"}
    json.dumps(meta)  # JSON-able
    back = unflatten_optimizer_state(flat, json.loads(json.dumps(meta)))
    assert back["state"][0]["step"] == 4 and back["state"][0]["ratio"] == (1.5, None)
    assert back["state"][2] == {} and torch.equal(back["state"][0]["buf"], torch.ones(2))
    group = back["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and isinstance(group["betas"], tuple)
    assert group["nested"] == [(1, 2), {"x": (3,)}] and group["lr"] is flat["param_groups.0.lr"]
    with pytest.raises(ValueError, match="tensors: key 'bogus'"):
        unflatten_optimizer_state({**flat, "bogus": torch.ones(1)}, meta)
    with pytest.raises(ValueError, match="missing 'param_groups.0.lr'"):
        unflatten_optimizer_state({"state.0.buf": flat["state.0.buf"]}, meta)
    with pytest.raises(TypeError, match=r"state_dict\['state'\]\[0\]\['bad'\]"):
        flatten_optimizer_state({"state": {0: {"bad": object()}}, "param_groups": []})

    # Parameter names as keys (torch.distributed.checkpoint's full optimizer state dict).
    named = {"state": {"enc.0.weight": {"step": torch.tensor(2.0), "exp_avg": torch.ones(3)}},
             "param_groups": [{"params": ["enc.0.weight"], "betas": (0.9, 0.98)}]}
    flat, meta = flatten_optimizer_state(named)
    assert set(flat) == {"state.enc.0.weight.step", "state.enc.0.weight.exp_avg"}
    back = unflatten_optimizer_state(flat, json.loads(json.dumps(meta)))
    assert list(back["state"]) == ["enc.0.weight"] and back["param_groups"] == named["param_groups"]
    assert back["state"]["enc.0.weight"]["exp_avg"] is flat["state.enc.0.weight.exp_avg"]
    with pytest.raises(ValueError, match="not unique"):
        flatten_optimizer_state({"state": {"a.b": {"c": torch.ones(1)}, "a": {"b.c": torch.ones(1)}},
                                 "param_groups": []})


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1234)
    torch.rand(17)
    saved = rng_state()
    assert saved["cpu"].dtype == torch.uint8
    expected = (torch.rand(8), torch.randn(5), torch.randint(0, 1000, (6,)))
    path = save_checkpoint(tmp_path, 0, {"rng": saved}, {})
    torch.manual_seed(99)
    torch.rand(100)
    set_rng_state(load_checkpoint(path).tensors["rng"])
    got = (torch.rand(8), torch.randn(5), torch.randint(0, 1000, (6,)))
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown generator 'mps'"):
        set_rng_state({"mps": saved["cpu"]})
    with pytest.raises(ValueError, match=r"tensors\['cpu'\]"):
        set_rng_state({"cpu": saved["cpu"].float()})
    with pytest.raises(ValueError, match=r"tensors\['cpu'\]: 3 bytes"):
        set_rng_state({"cpu": saved["cpu"][:3]})


def test_bad_inputs(tmp_path):
    t = {"m": {"w": torch.ones(2)}}
    with pytest.raises(TypeError, match=r"state\['a'\]\['b'\]\[1\]: value of type object"):
        save_checkpoint(tmp_path, 1, t, {"a": {"b": [1, object()]}})
    with pytest.raises(TypeError, match=r"state\['w'\]: value of type Tensor .*tensors"):
        save_checkpoint(tmp_path, 1, t, {"w": torch.ones(1)})
    with pytest.raises(TypeError, match=r"state\['d'\]: dict key 1 is a int"):
        save_checkpoint(tmp_path, 1, t, {"d": {1: 2}})
    loop = []
    loop.append(loop)
    with pytest.raises(TypeError, match=r"state\['x'\]\[0\]: circular"):
        save_checkpoint(tmp_path, 1, t, {"x": loop})
    with pytest.raises(TypeError, match="state: expected"):
        save_checkpoint(tmp_path, 1, t, [1])
    for step in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="step"):
            save_checkpoint(tmp_path, step, t, {})
    for keep in (0, -2, 2.0):
        with pytest.raises(ValueError, match="keep"):
            save_checkpoint(tmp_path, 1, t, {}, keep=keep)
    with pytest.raises(ValueError, match="tensors: group name 'a/b'"):
        save_checkpoint(tmp_path, 1, {"a/b": {}}, {})
    with pytest.raises(TypeError, match=r"tensors\['m'\]\['w'\]: expected a torch.Tensor"):
        save_checkpoint(tmp_path, 1, {"m": {"w": [1.0]}}, {})
    with pytest.raises(TypeError, match="run_dir"):
        save_checkpoint(None, 1, t, {})
    # Nothing was written by any of the refused calls.
    assert not (tmp_path / "checkpoints").exists()
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
    assert clean_temporary(tmp_path / "nowhere") == 0

    missing = tmp_path / "checkpoints" / "step-00000005"
    with pytest.raises(FileNotFoundError, match="step-00000005"):
        load_checkpoint(missing)
    missing.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no state.json"):
        load_checkpoint(missing)
    assert latest_checkpoint(tmp_path) is None  # an empty step dir is not a checkpoint

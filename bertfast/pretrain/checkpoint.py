"""Atomic checkpoints of a pretraining run: safetensors for every tensor, JSON for the rest.

Layout (nothing is ever pickled; torch.save/torch.load are not used)::

    <run_dir>/checkpoints/step-00000100/
        <group>.safetensors    one file per tensor group (e.g. "model", "optimizer", "rng")
        state.json             {"format", "version", "step", "state": <the JSON state>,
                                "groups": {group: file}, "files": {file: {"bytes", "sha256"}}}

A save writes everything into ``checkpoints/.tmp-step-00000100-<pid>-<random>/``, fsyncs every
file and the directory, then renames the directory to its final name (the commit point) and
fsyncs ``checkpoints/``. A crash at any moment therefore leaves the previous complete checkpoints
plus, at most, a ``.tmp-*`` directory that no reader looks at (``clean_temporary`` removes it).
Directories are deleted by first renaming them to a ``.tmp-*`` name, so a half-deleted checkpoint
is never visible under a ``step-*`` name either.

Inside a ``.safetensors`` file the metadata (string -> string) holds:
    "keys":    JSON list of the group's keys in their original order,
    "aliases": JSON {alias key: stored key} for tensors that were views of the same memory
               (tied weights); only the stored key has bytes in the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

__all__ = [
    "Checkpoint",
    "clean_temporary",
    "flatten_optimizer_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "unflatten_optimizer_state",
]

FORMAT = "bertfast.pretrain.checkpoint"
VERSION = 1
STATE_FILE = "state.json"
CHECKPOINTS_DIR = "checkpoints"
TMP_PREFIX = ".tmp-"

_STEP_DIR = re.compile(r"step-(\d{8,})")
# A group name becomes a file name: no separators, no leading dot, nothing a shell mangles.
_GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_HASH_CHUNK = 1 << 22


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    path:    the ``step-*`` directory it was read from
    step:    the step it was saved at
    tensors: group name -> {key: CPU tensor}, keys in their saved order; an alias of a tied
             tensor is the same tensor object as the key it was tied to
    state:   the JSON state given to ``save_checkpoint`` (tuples come back as lists)
    """

    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict


# ----------------------------------------------------------------------------------------------
# validation


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _as_path(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path (str or os.PathLike), got {type(value).__name__}")
    return Path(value)


def _check_json(value: Any, path: str, active: set[int]) -> None:
    """Raise TypeError naming ``path`` unless ``value`` survives json.dumps/json.loads unchanged
    (up to tuple -> list): None, bool, int, float, str, and lists/tuples/str-keyed dicts of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple, dict)):
        if id(value) in active:
            raise TypeError(f"{path}: circular reference is not JSON-serializable")
        active.add(id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    # json would silently turn 1 into "1": the state would not load back equal
                    raise TypeError(f"{path}: dict key {key!r} is a {type(key).__name__}; JSON keys must be str")
                _check_json(item, f"{path}[{key!r}]", active)
        else:
            for i, item in enumerate(value):
                _check_json(item, f"{path}[{i}]", active)
        active.discard(id(value))
        return
    hint = " (put tensors in `tensors`)" if isinstance(value, torch.Tensor) else ""
    raise TypeError(f"{path}: value of type {type(value).__name__} is not JSON-serializable{hint}")


_DTYPE_OK: dict[torch.dtype, bool] = {}


def _dtype_supported(dtype: torch.dtype) -> bool:
    if dtype not in _DTYPE_OK:
        try:  # ask safetensors itself: its dtype table varies between versions
            safetensors.torch.save({"x": torch.empty(0, dtype=dtype)})
            _DTYPE_OK[dtype] = True
        except Exception:
            _DTYPE_OK[dtype] = False
    return _DTYPE_OK[dtype]


def _check_tensors(tensors: Any) -> None:
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors: expected dict[str, dict[str, torch.Tensor]], got {type(tensors).__name__}")
    for group, items in tensors.items():
        if not isinstance(group, str) or not _GROUP_NAME.fullmatch(group):
            raise ValueError(f"tensors: group name {group!r} must match {_GROUP_NAME.pattern} (it names a file)")
        if not isinstance(items, dict):
            raise TypeError(f"tensors[{group!r}]: expected dict[str, torch.Tensor], got {type(items).__name__}")
        for key, t in items.items():
            where = f"tensors[{group!r}][{key!r}]"
            if not isinstance(key, str):
                raise TypeError(f"tensors[{group!r}]: key {key!r} is a {type(key).__name__}, expected str")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
            if t.layout != torch.strided:
                raise TypeError(f"{where}: {t.layout} tensors are not supported (dense tensors only)")
            if t.device.type == "meta":
                raise ValueError(f"{where}: a meta tensor has no data to save")
            if not _dtype_supported(t.dtype):
                raise TypeError(f"{where}: dtype {t.dtype} is not supported by safetensors")


# ----------------------------------------------------------------------------------------------
# files


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (created / renamed names) durable."""
    if not hasattr(os, "O_DIRECTORY"):  # e.g. Windows: directories cannot be opened
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (fails if it exists)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _new_tmp_dir(ckpt_dir: Path, step: int) -> Path:
    """Create ``.tmp-step-<step>-<pid>-<random>`` (a fresh name: never someone else's)."""
    while True:
        path = ckpt_dir / f"{TMP_PREFIX}{_step_name(step)}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _tmp_name(ckpt_dir: Path, step: int) -> Path:
    """An unused ``.tmp-*`` name to rename a directory to (before deleting it)."""
    while True:
        path = ckpt_dir / f"{TMP_PREFIX}{_step_name(step)}-{os.getpid()}-{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path


def _remove_dir(ckpt_dir: Path, path: Path, step: int) -> None:
    """Delete a step directory: rename it out of sight first, so a crash mid-delete leaves only
    a ``.tmp-*`` directory (clean_temporary's business), never a half-deleted ``step-*``."""
    aside = _tmp_name(ckpt_dir, step)
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# tensors <-> safetensors bytes


def _serialize_group(items: dict[str, torch.Tensor]) -> bytes:
    """One group as safetensors bytes: CPU, contiguous, each memory region stored once."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    for key, t in items.items():
        t = t.detach()
        if t.numel() > 0:
            # The same view of the same memory (tied weights appear twice in a state_dict).
            view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                    t.stride(), t.dtype)
            if view in by_view:
                aliases[key] = by_view[view]
                continue
            by_view[view] = key
        stored[key] = t
    # Distinct tensors that still overlap in memory (a view of a slice of another) are refused by
    # safetensors: give each of those its own copy. Contiguous CPU tensors need no copy otherwise.
    ptr_count: dict[tuple, int] = {}
    for t in stored.values():
        ptr = (t.device, t.untyped_storage().data_ptr())
        ptr_count[ptr] = ptr_count.get(ptr, 0) + 1
    out: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        shared = ptr_count[(t.device, t.untyped_storage().data_ptr())] > 1
        t = t.to("cpu")
        out[key] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
    metadata = {"keys": json.dumps(list(items)), "aliases": json.dumps(aliases)}
    return safetensors.torch.save(out, metadata=metadata)


def _read_group(path: Path, label: str) -> dict[str, torch.Tensor]:
    """Read one verified safetensors file and restore its key order and aliases."""
    try:
        loaded = safetensors.torch.load_file(path)
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        keys = json.loads(metadata.get("keys", "null"))
        aliases = json.loads(metadata.get("aliases", "{}"))
    except Exception as e:  # the bytes matched the manifest, so this was written broken
        raise ValueError(f"{label} is corrupt ({type(e).__name__}: {e})") from e
    if keys is None:
        keys = sorted(loaded) + sorted(aliases)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        source = aliases.get(key, key)
        if source not in loaded:
            raise ValueError(f"{label} is corrupt (key {key!r} has no tensor)")
        out[key] = loaded[source]
    return out


# ----------------------------------------------------------------------------------------------
# public API


def save_checkpoint(run_dir, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int = 2) -> Path:
    """Atomically write ``<run_dir>/checkpoints/step-<step:08d>/`` and return its path.

    tensors: group name -> {key: tensor}; any device, any layout of strides; tied tensors (same
             memory, same view) are stored once and come back under every key. Group names
             match ``[A-Za-z0-9_][A-Za-z0-9_.-]*`` (each becomes ``<group>.safetensors``).
    state:   a JSON-serializable dict (str keys; floats round-trip exactly); checked before
             anything is written (TypeError naming the key path).
    keep:    after the commit, step directories older than ``step`` are deleted except the
             ``keep - 1`` newest complete ones (newer steps, if any, are left alone).
    An existing checkpoint of the same step is replaced: old renamed aside, new renamed in, old
    deleted. If the save raises, its temporary directory is removed and nothing else changed.
    """
    run_dir = _as_path("run_dir", run_dir)
    _check_int("step", step, 0)
    _check_int("keep", keep, 1)
    _check_tensors(tensors)
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a JSON-serializable dict, got {type(state).__name__}")
    _check_json(state, "state", set())
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir: {run_dir} exists and is not a directory")

    ckpt_dir = run_dir / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _fsync_dir(ckpt_dir.parent)
    final = ckpt_dir / _step_name(step)
    tmp = _new_tmp_dir(ckpt_dir, step)
    try:
        files: dict[str, dict[str, Any]] = {}
        groups: dict[str, str] = {}
        for group, items in tensors.items():
            # One group in memory at a time: peak extra memory is the largest group's bytes.
            data = _serialize_group(items)
            name = f"{group}.safetensors"
            _write_bytes(tmp / name, data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            groups[group] = name
            del data
        doc = {"format": FORMAT, "version": VERSION, "step": step, "groups": groups, "files": files,
               "state": state}
        # state.json last: a directory without it is never taken for a checkpoint.
        _write_bytes(tmp / STATE_FILE, json.dumps(doc, indent=1).encode("utf-8"))
        _fsync_dir(tmp)
        if os.path.lexists(final):
            aside = _tmp_name(ckpt_dir, step)
            os.rename(final, aside)
            os.rename(tmp, final)  # the commit point
            _fsync_dir(ckpt_dir)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)  # the commit point
            _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _prune(ckpt_dir, step, keep)
    return final


def _prune(ckpt_dir: Path, step: int, keep: int) -> None:
    older = sorted((s, p) for s, p in _step_dirs(ckpt_dir) if s < step)
    complete = [(s, p) for s, p in older if _is_complete(p, s)]
    spared = {p for _, p in complete[max(0, len(complete) - (keep - 1)):]} if keep > 1 else set()
    removed = False
    for s, p in older:
        if p not in spared:
            _remove_dir(ckpt_dir, p, s)
            removed = True
    if removed:
        _fsync_dir(ckpt_dir)


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``step-*`` directory, complete or not."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for entry in ckpt_dir.iterdir():
        m = _STEP_DIR.fullmatch(entry.name)
        if m and entry.is_dir():
            out.append((int(m.group(1)), entry))
    return out


def _read_manifest(path: Path) -> dict:
    """state.json of a step directory, structure-checked (ValueError when malformed)."""
    text = (path / STATE_FILE).read_bytes()
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{STATE_FILE} is corrupt ({type(e).__name__}: {e})") from e
    ok = (isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("step"), int)
          and isinstance(doc.get("groups"), dict) and isinstance(doc.get("files"), dict)
          and isinstance(doc.get("state"), dict)
          and all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                  for v in doc["files"].values())
          and all(isinstance(v, str) and v in doc["files"] for v in doc["groups"].values()))
    if not ok:
        raise ValueError(f"{STATE_FILE} is corrupt (not a {FORMAT} manifest)")
    if doc.get("version") != VERSION:
        raise ValueError(f"{STATE_FILE}: format version {doc.get('version')!r} is not supported (expected {VERSION})")
    for name in doc["files"]:
        if Path(name).name != name or name.startswith(".") or name == STATE_FILE:
            raise ValueError(f"{STATE_FILE} is corrupt (bad file name {name!r})")
    return doc


def _is_complete(path: Path, step: int | None = None) -> bool:
    """state.json readable, and every manifest file present with its recorded size."""
    try:
        doc = _read_manifest(path)
        if step is not None and doc["step"] != step:
            return False
        return all((path / name).is_file() and (path / name).stat().st_size == info["bytes"]
                   for name, info in doc["files"].items())
    except (OSError, ValueError):
        return False


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of ``run_dir`` (``step-*`` dirs whose state.json parses and whose
    files have their manifest sizes), ascending step. Ignores ``.tmp-*`` and incomplete dirs."""
    ckpt_dir = _as_path("run_dir", run_dir) / CHECKPOINTS_DIR
    return [p for s, p in sorted(_step_dirs(ckpt_dir)) if _is_complete(p, s)]


def latest_checkpoint(run_dir) -> Path | None:
    """The complete checkpoint with the highest step (see list_checkpoints), or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_temporary(run_dir) -> int:
    """Remove leftover ``checkpoints/.tmp-*`` entries (from a save or delete that was killed);
    return how many. Call it when no other process is saving into ``run_dir``."""
    ckpt_dir = _as_path("run_dir", run_dir) / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        return 0
    count = 0
    for entry in sorted(ckpt_dir.iterdir()):
        if not entry.name.startswith(TMP_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        count += 1
    if count:
        _fsync_dir(ckpt_dir)
    return count


def load_checkpoint(path) -> Checkpoint:
    """Load a ``step-*`` directory, verifying every file's size and sha256 against state.json.

    FileNotFoundError when ``path`` or its state.json is missing; ValueError
    "checkpoint <path>: <file> is corrupt (...)" for a truncated, missing or altered file.
    Tensors are read with safetensors.torch.load_file (never unpickled), onto the CPU.
    """
    path = _as_path("path", path)
    if not path.exists():
        raise FileNotFoundError(f"path: checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"path: {path} is not a checkpoint directory")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"path: {path} has no {STATE_FILE} (not a complete checkpoint)")
    try:
        doc = _read_manifest(path)
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: {e}") from e
    for name, info in doc["files"].items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path}: {name} is corrupt (missing)")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise ValueError(f"checkpoint {path}: {name} is corrupt ({size} bytes, manifest says {info['bytes']})")
        digest = _sha256_file(file)
        if digest != info["sha256"]:
            raise ValueError(f"checkpoint {path}: {name} is corrupt (sha256 {digest} != manifest {info['sha256']})")
    tensors = {group: _read_group(path / name, f"checkpoint {path}: {name}")
               for group, name in doc["groups"].items()}
    return Checkpoint(path=path, step=doc["step"], tensors=tensors, state=doc["state"])


# ----------------------------------------------------------------------------------------------
# optimizer state


_TUPLE = "__tuple__"
_TENSOR = "__tensor__"


def _encode(value: Any, path: str, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of an optimizer state value: tensors moved to ``tensors[key]`` and replaced by
    {"__tensor__": key}, tuples tagged {"__tuple__": [...]} so that they come back as tuples."""
    if isinstance(value, torch.Tensor):
        if key in tensors:  # only possible with str param keys such as "a.b" + "c" vs "a" + "b.c"
            raise ValueError(f"{path}: tensor key {key!r} is not unique")
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}[{i}]", f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}[{i}]", f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: dict key {k!r} is a {type(k).__name__}; JSON keys must be str")
            if k in (_TUPLE, _TENSOR):
                raise TypeError(f"{path}: dict key {k!r} is reserved")
            out[k] = _encode(v, f"{path}[{k!r}]", f"{key}.{k}", tensors)
        return out
    _check_json(value, path, set())
    return value


def _decode(value: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE} and isinstance(value[_TUPLE], list):
            return tuple(_decode(v, tensors, used) for v in value[_TUPLE])
        if set(value) == {_TENSOR} and isinstance(value[_TENSOR], str):
            key = value[_TENSOR]
            if key not in tensors:
                raise ValueError(f"tensors: missing {key!r}, which meta refers to")
            used.add(key)
            return tensors[key]
        return {k: _decode(v, tensors, used) for k, v in value.items()}
    return value


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into (tensors, JSON-able meta).

    state_dict: {"state": {param key: {name: value}}, "param_groups": [dict]}, as from
                ``optimizer.state_dict()`` (int param keys) or torch.distributed.checkpoint's
                ``get_state_dict`` (str parameter names as keys).
    tensors:    "state.<param key>.<name>" -> tensor (e.g. "state.0.exp_avg", "state.0.step");
                a tensor inside param_groups (a tensor lr) -> "param_groups.<i>.<name>".
    meta:       {"state": [[param key, {name: value}], ...], "param_groups": [...]}: every tensor
                replaced by {"__tensor__": its key}, every tuple (e.g. betas) written as
                {"__tuple__": [...]} so that it comes back as a tuple; param keys keep int/str.
    The tensors are the optimizer's own (not copies): save them before the next step.
    """
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        raise TypeError("state_dict: expected an optimizer state_dict with 'state' (dict) and 'param_groups' (list)")
    extra = sorted(map(str, set(state_dict) - {"state", "param_groups"}))
    if extra:
        raise ValueError(f"state_dict: unexpected top-level keys {extra}")
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for index, per_param in state_dict["state"].items():
        where = f"state_dict['state'][{index!r}]"
        if isinstance(index, bool) or not isinstance(index, (int, str)):
            raise TypeError(f"state_dict['state']: key {index!r} is a {type(index).__name__}, "
                            "expected a param index (int) or name (str)")
        if not isinstance(per_param, dict):
            raise TypeError(f"{where}: expected a dict, got {type(per_param).__name__}")
        entries.append([index, _encode(per_param, where, f"state.{index}", tensors)])
    groups = []
    for i, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, dict):
            raise TypeError(f"state_dict['param_groups'][{i}]: expected a dict, got {type(group).__name__}")
        groups.append(_encode(group, f"state_dict['param_groups'][{i}]", f"param_groups.{i}", tensors))
    return tensors, {"state": entries, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of flatten_optimizer_state: a dict for ``optimizer.load_state_dict``,
    {"state": {param key: {name: tensor or value}}, "param_groups": [...]} (tuples restored).
    Every tensor must be referenced by ``meta`` and every reference present (else ValueError)."""
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise TypeError("tensors: expected dict[str, torch.Tensor]")
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), list) \
            or not isinstance(meta.get("param_groups"), list):
        raise ValueError("meta: expected {'state': list, 'param_groups': list} from flatten_optimizer_state")
    used: set[str] = set()
    state: dict[int | str, dict[str, Any]] = {}
    for entry in meta["state"]:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict) \
            and isinstance(entry[0], (int, str)) and not isinstance(entry[0], bool)
        if not ok:
            raise ValueError(f"meta['state']: bad entry {entry!r} (expected [param key, dict])")
        state[entry[0]] = _decode(entry[1], tensors, used)
    groups = [_decode(g, tensors, used) for g in meta["param_groups"]]
    unused = [k for k in tensors if k not in used]
    if unused:
        raise ValueError(f"tensors: key {unused[0]!r} is not referenced by meta ({len(unused)} such keys)")
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# random number generators


def rng_state() -> dict[str, torch.Tensor]:
    """Torch's generator states as uint8 tensors: "cpu", plus "cuda:<i>" for every CUDA device
    when CUDA is already initialized (never initializes it)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            out[f"cuda:{i}"] = torch.cuda.get_rng_state(i)
    return out


_CUDA_KEY = re.compile(r"cuda:(\d+)")


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    """Restore states from ``rng_state()``. "cuda:<i>" entries for devices this process does not
    have are skipped (a run resumed on other hardware cannot replay their draws anyway)."""
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors: expected dict[str, torch.Tensor], got {type(tensors).__name__}")
    for key, t in tensors.items():
        if key != "cpu" and not (isinstance(key, str) and _CUDA_KEY.fullmatch(key)):
            raise ValueError(f"tensors: unknown generator {key!r} (expected 'cpu' or 'cuda:<i>')")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            raise ValueError(f"tensors[{key!r}]: expected a 1-D uint8 tensor of generator state")
    if "cpu" in tensors:
        cpu = tensors["cpu"].to("cpu").contiguous()
        if cpu.numel() != torch.get_rng_state().numel():
            raise ValueError(f"tensors['cpu']: {cpu.numel()} bytes, torch's CPU generator state has "
                             f"{torch.get_rng_state().numel()}")
        torch.set_rng_state(cpu)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key, t in tensors.items():
        m = _CUDA_KEY.fullmatch(key)
        if m and int(m.group(1)) < count:
            torch.cuda.set_rng_state(t.to("cpu").contiguous(), int(m.group(1)))


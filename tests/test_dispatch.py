"""Backend dispatch (bertfast.ops.dispatch), exercised through the public ops.

Precedence: an op's ``backend=`` argument > the innermost ``bertfast.use_backend(...)`` >
the ``BERTFAST_BACKEND`` environment variable > every backend, fastest first. On this CPU-only
machine only the torch backends exist, so "triton" / "cuda" requests must fail with an error that
lists every backend and why it refused. Backends with custom ``refuse`` functions are tested on a
fresh ``Op`` so that no registration leaks into the real ops.
"""

from __future__ import annotations

import re

import pytest
import torch

import bertfast
from bertfast import ops
from bertfast.ops import ALL_OPS, BackendUnavailableError, dispatch
from bertfast.ops.dispatch import BACKEND_NAMES, ENV_VAR, Op, requested_backends


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Every test starts with no env override and no active use_backend context."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert requested_backends() == BACKEND_NAMES, "a use_backend context leaked from an earlier test"
    yield
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert requested_backends() == BACKEND_NAMES, "this test leaked a use_backend context"


def _rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


# One small valid call per public op; `kw` carries backend= when a test passes one.
CALLS = {
    "attention": lambda **kw: ops.attention(_rand(1, 3, 2, 4), _rand(1, 3, 2, 4), _rand(1, 3, 2, 4),
                                            key_padding_mask=torch.tensor([[True, True, False]]), **kw),
    "layer_norm": lambda **kw: ops.layer_norm(_rand(2, 5), _rand(5), _rand(5), 1e-5, **kw),
    "bias_gelu": lambda **kw: ops.bias_gelu(_rand(2, 5), _rand(5), "tanh", **kw),
    "linear_gelu": lambda **kw: ops.linear_gelu(_rand(2, 3), _rand(5, 3), _rand(5), "tanh", **kw),
    "embedding": lambda **kw: ops.embedding(torch.tensor([[1, 6, 0]]), torch.arange(3)[None], torch.zeros(1, 3,
                                            dtype=torch.long), _rand(7, 4), _rand(5, 4), _rand(2, 4),
                                            torch.ones(4), torch.zeros(4), **kw),
    "mlm_loss": lambda **kw: ops.mlm_loss(_rand(1, 3, 4), torch.tensor([[1, -100, 2]]), _rand(4, 4), _rand(4),
                                          torch.ones(4), torch.zeros(4), _rand(7, 4), _rand(7), **kw),
    "sentence_pair_loss": lambda **kw: ops.sentence_pair_loss(_rand(2, 4), _rand(2, 4), _rand(2),
                                                              torch.tensor([0, 1]), **kw),
    "rtd_loss": lambda **kw: ops.rtd_loss(_rand(1, 3, 4), _rand(4, 4), _rand(4), _rand(1, 4), _rand(1),
                                          torch.tensor([[0, 1, 0]]), torch.tensor([[True, True, False]]), **kw),
    "sample_tokens": lambda **kw: ops.sample_tokens(_rand(3, 7), seed=0, **kw),
    "mask_tokens": lambda **kw: ops.mask_tokens(torch.tensor([[1, 6, 0]]), torch.tensor([7]), 0, vocab_size=7,
                                                mask_token_id=2, special_token_ids=(0, 1), **kw),
    "generator_sample": lambda **kw: ops.generator_sample(_rand(1, 3, 4), torch.tensor([[1, -100, 2]]),
                                                          torch.tensor([[5, 6, 0]]), _rand(4, 4), _rand(4),
                                                          torch.ones(4), torch.zeros(4), _rand(7, 4), _rand(7),
                                                          seed=0, **kw),
}
OP_NAMES = sorted(CALLS)


def _own(trace: list[tuple[str, str]], op_name: str) -> list[tuple[str, str]]:
    """The trace entries of ``op_name`` itself (linear_gelu's torch backend calls the bias_gelu op)."""
    return [entry for entry in trace if entry[0] == op_name]


def _reasons(message: str) -> dict[str, str]:
    """backend -> reason, from the indented lines of a BackendUnavailableError message."""
    return dict(re.findall(r"^  (\w+): (.+)$", message, flags=re.MULTILINE))


def _assert_lists_every_backend(message: str, op_name: str, requested: tuple[str, ...]):
    first = message.splitlines()[0]
    assert first.startswith(f"{op_name}:"), message
    assert f"requested: {', '.join(requested)}" in first, message
    reasons = _reasons(message)
    assert set(reasons) == {"cuda", "triton", "torch"} == set(BACKEND_NAMES), message
    for name, reason in reasons.items():
        assert reason.strip(), f"{name} has no reason in:\n{message}"
        if name not in requested:
            assert reason.startswith("not requested"), message
    return reasons


def test_every_public_op_is_covered():
    assert set(CALLS) == set(ALL_OPS)
    for name, op in ALL_OPS.items():
        assert op.name == name and "torch" in op.backends


def test_public_names_are_the_dispatch_objects():
    assert bertfast.use_backend is ops.use_backend is dispatch.use_backend
    assert bertfast.record_backends is ops.record_backends is dispatch.record_backends
    assert ops.BackendUnavailableError is dispatch.BackendUnavailableError
    assert issubclass(BackendUnavailableError, RuntimeError)


# --------------------------------------------------------------------------------------------
# Each public op: default, explicit torch, unavailable backends
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op_name", OP_NAMES)
def test_default_and_explicit_torch_run_torch(op_name):
    with bertfast.record_backends() as trace:
        default = CALLS[op_name]()
        explicit = CALLS[op_name](backend="torch")
    assert _own(trace, op_name) == [(op_name, "torch"), (op_name, "torch")]
    assert all(backend == "torch" for _, backend in trace)
    for a, b in zip(default if isinstance(default, tuple) else (default,),
                    explicit if isinstance(explicit, tuple) else (explicit,)):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("op_name", OP_NAMES)
@pytest.mark.parametrize("backend", ["triton", "cuda", "cuda,triton"])
def test_unservable_request_lists_every_backend_with_a_reason(op_name, backend):
    with bertfast.record_backends() as trace, pytest.raises(BackendUnavailableError) as info:
        CALLS[op_name](backend=backend)
    assert trace == []  # nothing ran
    requested = tuple(backend.split(","))
    reasons = _assert_lists_every_backend(str(info.value), op_name, requested)
    for name in requested:  # a requested backend says why it cannot run, not "not requested"
        assert not reasons[name].startswith("not requested")
    assert reasons["torch"] == "not requested"  # torch could have run: no further reason


@pytest.mark.parametrize("op_name", OP_NAMES)
def test_preference_list_falls_back_to_torch(op_name):
    with bertfast.record_backends() as trace:
        with bertfast.use_backend("triton", "torch"):
            CALLS[op_name]()
        with bertfast.use_backend("cuda", "triton", "torch"):
            CALLS[op_name]()
        CALLS[op_name](backend="triton,torch")
    assert _own(trace, op_name) == [(op_name, "torch")] * 3
    assert all(backend == "torch" for _, backend in trace)


# --------------------------------------------------------------------------------------------
# use_backend: nesting and cleanup
# --------------------------------------------------------------------------------------------

def test_use_backend_forces_and_restores():
    call = CALLS["layer_norm"]
    with bertfast.use_backend("triton"):
        assert requested_backends() == ("triton",)
        with pytest.raises(BackendUnavailableError):
            call()
    assert requested_backends() == BACKEND_NAMES
    call()


def test_use_backend_nesting_innermost_wins():
    call = CALLS["bias_gelu"]
    with bertfast.use_backend("torch"):
        call()
        with bertfast.use_backend("triton"):
            with pytest.raises(BackendUnavailableError, match="requested: triton"):
                call()
            with bertfast.use_backend("cuda", "torch"):
                assert requested_backends() == ("cuda", "torch")
                call()
            with pytest.raises(BackendUnavailableError):  # back to the middle context
                call()
        assert requested_backends() == ("torch",)
        call()


def test_use_backend_pops_on_exception():
    with pytest.raises(KeyError), bertfast.use_backend("triton"):
        raise KeyError("boom")
    assert requested_backends() == BACKEND_NAMES
    with pytest.raises(BackendUnavailableError), bertfast.use_backend("cuda"):
        CALLS["attention"]()
    assert requested_backends() == BACKEND_NAMES


# --------------------------------------------------------------------------------------------
# BERTFAST_BACKEND
# --------------------------------------------------------------------------------------------

def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError) as info:
        CALLS["mlm_loss"]()
    _assert_lists_every_backend(str(info.value), "mlm_loss", ("triton",))
    monkeypatch.setenv(ENV_VAR, "torch")
    with bertfast.record_backends() as trace:
        CALLS["mlm_loss"]()
    assert trace == [("mlm_loss", "torch")]


@pytest.mark.parametrize("value,expected", [
    ("triton,torch", ("triton", "torch")),
    (" cuda , triton ,torch ", ("cuda", "triton", "torch")),
    ("torch,", ("torch",)),
    ("", BACKEND_NAMES),  # set but empty = unset
])
def test_env_var_comma_lists(monkeypatch, value, expected):
    monkeypatch.setenv(ENV_VAR, value)
    assert requested_backends() == expected
    with bertfast.record_backends() as trace:
        CALLS["rtd_loss"]()
    assert trace == [("rtd_loss", "torch")]


def test_env_var_read_at_call_time(monkeypatch):
    call = CALLS["sentence_pair_loss"]
    call()
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError):
        call()
    monkeypatch.delenv(ENV_VAR)
    call()


# --------------------------------------------------------------------------------------------
# Precedence: argument > context > env > default
# --------------------------------------------------------------------------------------------

def test_argument_beats_context_and_env(monkeypatch):
    call = CALLS["embedding"]
    monkeypatch.setenv(ENV_VAR, "triton")
    with bertfast.use_backend("cuda"):
        with bertfast.record_backends() as trace:
            call(backend="torch")
        assert trace == [("embedding", "torch")]
    monkeypatch.setenv(ENV_VAR, "torch")
    with bertfast.use_backend("torch"), pytest.raises(BackendUnavailableError, match="requested: triton"):
        call(backend="triton")


def test_context_beats_env(monkeypatch):
    call = CALLS["sample_tokens"]
    monkeypatch.setenv(ENV_VAR, "triton")
    with bertfast.use_backend("torch"):
        call()
    monkeypatch.setenv(ENV_VAR, "torch")
    with bertfast.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="requested: cuda"):
        call()


def test_env_beats_default(monkeypatch):
    call = CALLS["attention"]
    call()  # default: fastest supported, here torch
    monkeypatch.setenv(ENV_VAR, "cuda,triton")
    with pytest.raises(BackendUnavailableError, match=r"requested: cuda, triton\)"):
        call()


def test_requested_backends_precedence(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton,torch")
    assert requested_backends() == ("triton", "torch")
    with bertfast.use_backend("cuda", "torch"):
        assert requested_backends() == ("cuda", "torch")
        assert requested_backends("torch") == ("torch",)


# --------------------------------------------------------------------------------------------
# Unknown and empty names: ValueError naming where the name came from
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op_name", ["attention", "layer_norm", "sample_tokens"])
def test_unknown_backend_argument(op_name):
    with pytest.raises(ValueError, match=r"^backend: unknown backend 'tpu'; known backends: cuda, triton, torch"):
        CALLS[op_name](backend="tpu")
    with pytest.raises(ValueError, match=r"^backend: unknown backend 'Torch'"):
        CALLS[op_name](backend="torch,Torch")
    with pytest.raises(ValueError, match=r"^backend: empty backend list"):
        CALLS[op_name](backend=" , ")


def test_unknown_use_backend_name():
    unknown = r"^use_backend: unknown backend 'metal'; known backends: cuda, triton, torch"
    with pytest.raises(ValueError, match=unknown), bertfast.use_backend("torch", "metal"):
        pass
    with pytest.raises(ValueError, match=r"^use_backend: empty backend list"), bertfast.use_backend():
        pass
    assert requested_backends() == BACKEND_NAMES


@pytest.mark.parametrize("value,pattern", [
    ("gpu", r"^BERTFAST_BACKEND: unknown backend 'gpu'; known backends: cuda, triton, torch"),
    ("torch,xla", r"^BERTFAST_BACKEND: unknown backend 'xla'"),
    (" , ", r"^BERTFAST_BACKEND: empty backend list"),
])
def test_unknown_env_backend(monkeypatch, value, pattern):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ValueError, match=pattern):
        CALLS["bias_gelu"]()
    # an explicit argument does not consult the environment at all
    CALLS["bias_gelu"](backend="torch")


# --------------------------------------------------------------------------------------------
# record_backends
# --------------------------------------------------------------------------------------------

def test_record_backends_in_call_order_and_nesting():
    with bertfast.record_backends() as outer:
        CALLS["layer_norm"]()
        with bertfast.record_backends() as inner:
            CALLS["bias_gelu"]()
            CALLS["attention"](backend="torch")
        CALLS["sample_tokens"]()
    assert inner == [("bias_gelu", "torch"), ("attention", "torch")]
    assert outer == [("layer_norm", "torch"), ("bias_gelu", "torch"), ("attention", "torch"),
                     ("sample_tokens", "torch")]
    CALLS["layer_norm"]()  # after the block: recorded nowhere
    assert len(outer) == 4 and len(inner) == 2


def test_record_backends_stops_on_exception():
    with pytest.raises(BackendUnavailableError), bertfast.record_backends() as trace:
        CALLS["rtd_loss"]()
        CALLS["rtd_loss"](backend="cuda")
    assert trace == [("rtd_loss", "torch")]
    CALLS["rtd_loss"]()
    assert trace == [("rtd_loss", "torch")]


def test_record_backends_sees_module_calls():
    """Ops called inside bertfast.nn modules are recorded too: no backend choice is hidden."""
    x = _rand(2, 3, 8)
    with bertfast.record_backends() as trace:
        bertfast.nn.LayerNorm(8)(x)
        bertfast.nn.LinearGELU(8, 5)(x)
    # LinearGELU: the linear_gelu op, whose torch backend is cuBLAS + the bias_gelu op
    assert trace == [("layer_norm", "torch"), ("linear_gelu", "torch"), ("bias_gelu", "torch")]
    with bertfast.use_backend("triton"), pytest.raises(BackendUnavailableError):
        bertfast.nn.LayerNorm(8)(x)


# --------------------------------------------------------------------------------------------
# A fake backend with its own refuse(), on a fresh Op (no global registration)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def fake_op():
    op = Op("fake_op")
    seen = []

    def cuda_refuse(facts):
        seen.append(dict(facts))
        if facts["device"] != "cpu":
            return f"fake kernels run on cpu here, got {facts['device']}"
        if facts["dtype"] != torch.float32:
            return f"only float32, got {facts['dtype']}"
        return None

    # register torch first: the preference order must still be BACKEND_NAMES (cuda first)
    op.register("torch")(lambda x: ("torch", x))
    op.register("cuda", refuse=cuda_refuse)(lambda x: ("cuda", x))
    op.seen = seen
    return op


F32 = {"device": "cpu", "dtype": torch.float32}
F64 = {"device": "cpu", "dtype": torch.float64}


def test_fake_backend_picked_when_it_accepts(fake_op):
    with bertfast.record_backends() as trace:
        chosen = fake_op.select(None, F32)
    assert chosen.name == "cuda" and chosen.impl(1) == ("cuda", 1)
    assert fake_op.seen[-1] == F32  # refuse() got the call's facts
    assert trace == [("fake_op", "cuda")]
    assert fake_op.refusal("cuda", F32) is None
    assert fake_op.refusal("triton", F32) == "no triton implementation of fake_op yet"


def test_fake_backend_skipped_with_its_reason_when_it_refuses(fake_op):
    with bertfast.record_backends() as trace:
        chosen = fake_op.select(None, F64)
    assert chosen.name == "torch" and trace == [("fake_op", "torch")]
    assert fake_op.refusal("cuda", F64) == "only float32, got torch.float64"
    with pytest.raises(BackendUnavailableError) as info:
        fake_op.select("cuda", F64)
    reasons = _assert_lists_every_backend(str(info.value), "fake_op", ("cuda",))
    assert reasons["cuda"] == "only float32, got torch.float64"
    assert reasons["torch"] == "not requested"
    assert reasons["triton"] == "not requested (and: no triton implementation of fake_op yet)"


def test_fake_backend_reasons_when_nothing_accepts(fake_op):
    fake_op.register("torch", refuse=lambda facts: "the fake reference refuses too")(lambda x: ("torch", x))
    with pytest.raises(BackendUnavailableError) as info:
        fake_op.select(None, {"device": "meta", "dtype": torch.float32})
    reasons = _assert_lists_every_backend(str(info.value), "fake_op", BACKEND_NAMES)
    assert reasons == {"cuda": "fake kernels run on cpu here, got meta",
                       "triton": "no triton implementation of fake_op yet",
                       "torch": "the fake reference refuses too"}


def test_fake_backend_follows_context_and_env(fake_op, monkeypatch):
    with bertfast.use_backend("torch"):
        assert fake_op.select(None, F32).name == "torch"
        assert fake_op.select("cuda", F32).name == "cuda"
    monkeypatch.setenv(ENV_VAR, "triton,torch")
    assert fake_op.select(None, F32).name == "torch"
    monkeypatch.setenv(ENV_VAR, "cuda")
    assert fake_op.select(None, F32).name == "cuda"
    with pytest.raises(BackendUnavailableError, match="only float32"):
        fake_op.select(None, F64)


def test_fake_registration_does_not_leak(fake_op):
    assert "fake_op" not in ALL_OPS
    assert all(name != "fake_op" for name in (op.name for op in ALL_OPS.values()))
    with pytest.raises(ValueError, match=r"^backend: unknown backend 'metal'"):
        fake_op.register("metal")
    assert set(fake_op.backends) == {"cuda", "torch"}


def test_record_backends_does_not_recompile_a_compiled_model():
    """A compiled module called inside and outside record_backends() compiles once: recording is
    skipped while dynamo traces (it would guard the graph on the trace stack)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    norm = torch.compile(bertfast.nn.LayerNorm(8), backend=counter)
    x = _rand(2, 3, 8)
    norm(x)
    for _ in range(3):
        with bertfast.record_backends():
            norm(x)
    norm(x)
    assert counter.frame_count == 1

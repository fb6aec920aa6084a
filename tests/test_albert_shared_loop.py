"""ALBERT's fused shared-layer loop (bertfast.models.shared_loop) against the plain autograd loop:
loss and every parameter gradient for every sharing mode, group layout, padded/unpadded, with and
without recomputation; dropout masks redrawn by recomputation; gradient accumulation; float32
accumulation of bfloat16 gradients; frozen parameters; DDP (2 gloo processes); torch.compile."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from bertfast import models
from bertfast.models import shared_loop
from bertfast.models.albert import set_layer_loop
from helpers import EXTRA, SIZES, assert_grads_close, assert_rel_close, mlm_labels, ragged_batch, randomize_

SOP = torch.tensor([1, 0, 1, 0])


def _model(dtype=torch.float64, seed=0, **overrides) -> models.AlbertForPreTraining:
    config = models.AlbertConfig(**{**SIZES, **EXTRA["albert"], **overrides})
    model = models.AlbertForPreTraining(config).to(dtype)
    randomize_(model, seed)
    return model


def _batch(seed=0):
    ids, mask, types = ragged_batch("albert", seed=seed)
    return (ids, mask, types), {"labels": mlm_labels(ids, mask, seed=seed + 1), "sentence_order_label": SOP}


def _encoder_node(model) -> list[str]:
    """Records the type of the encoder output's grad_fn at every forward (which loop ran)."""
    seen = []
    model.albert.encoder.register_forward_hook(lambda m, args, out: seen.append(type(out.grad_fn).__name__))
    return seen


def _step(model, loop, recompute=False, batch=None, zero=True, seed=None):
    """loss after forward + backward with the given loop; gradients are left in the model."""
    set_layer_loop(model, loop, recompute)
    if zero:
        model.zero_grad(set_to_none=True)
    args, kwargs = batch if batch is not None else _batch()
    if seed is not None:
        torch.manual_seed(seed)
    out = model(*args, **kwargs)
    out.loss.backward()
    return out.loss.detach()


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _twin(model):
    """A copy with the same weights (its own gradients)."""
    twin = type(model)(model.config).to(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    return twin


# Every sharing mode x group layout; "none" builds one group per layer whatever num_hidden_groups says.
LAYOUTS = [(s, g, i) for s in ("all", "attention", "ffn") for g in (1, 2) for i in (1, 2)] + \
          [("none", 1, 1), ("none", 1, 2)]


@pytest.mark.parametrize("recompute", [False, True], ids=["graph", "recompute"])
@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
@pytest.mark.parametrize("sharing,groups,inner", LAYOUTS)
def test_fused_loop_equals_autograd_loop_float64(sharing, groups, inner, unpad, recompute):
    model = _model(sharing=sharing, num_hidden_groups=groups, inner_group_num=inner)
    models.set_unpad(model, unpad)
    reference = _twin(model)
    models.set_unpad(reference, unpad)
    seen = _encoder_node(model)
    expected = _step(reference, "autograd")
    actual = _step(model, "fused", recompute)
    assert seen == ["_LayerLoopBackward"]
    assert_rel_close(actual, expected, 1e-12, "loss")
    assert_grads_close(model, reference, 1e-12, f"{sharing} groups={groups} inner={inner}")


@pytest.mark.parametrize("recompute", [False, True], ids=["graph", "recompute"])
@pytest.mark.parametrize("sharing", ["all", "none", "attention", "ffn"])
def test_fused_loop_equals_autograd_loop_float32(sharing, recompute):
    groups = 1 if sharing == "none" else 2
    model = _model(torch.float32, sharing=sharing, num_hidden_groups=groups)
    reference = _twin(model)
    expected = _step(reference, "autograd")
    actual = _step(model, "fused", recompute)
    assert_rel_close(actual, expected, 1e-5, "loss")
    assert_grads_close(model, reference, 1e-5, sharing)


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
@pytest.mark.parametrize("sharing", ["all", "ffn"])
def test_recomputation_redraws_the_dropout_masks(sharing, unpad):
    """Same torch.manual_seed: the fused loop draws the plain loop's masks, recomputation redraws
    them in the backward (bit for bit), and leaves the generator where the plain loop leaves it."""
    dropout = {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2}
    model = _model(sharing=sharing, **dropout)
    models.set_unpad(model, unpad)
    batch = _batch()
    runs = {}
    for name, loop, recompute in [("plain", "autograd", False), ("graph", "fused", False),
                                  ("recompute", "fused", True)]:
        loss = _step(model, loop, recompute, batch, seed=5)
        runs[name] = (loss, _grads(model), torch.get_rng_state())
    plain, graph, recomputed = runs["plain"], runs["graph"], runs["recompute"]
    assert torch.equal(recomputed[0], graph[0]) and torch.equal(graph[0], plain[0])
    for name, g in graph[1].items():
        assert torch.equal(recomputed[1][name], g), f"recomputed grad {name}"
        assert_rel_close(g, plain[1][name], 1e-12, f"grad {name}", floor=1.0)
    assert torch.equal(recomputed[2], plain[2]) and torch.equal(graph[2], plain[2])
    # The masks matter: another seed gives other gradients (so the checks above can fail).
    _step(model, "fused", True, batch, seed=6)
    assert any(not torch.equal(p.grad, graph[1][n]) for n, p in model.named_parameters())


def test_recomputation_restores_autocast():
    """Under CPU bfloat16 autocast the recomputed steps run in bfloat16 again: the gradients equal
    the recorded graph's bit for bit."""
    model = _model(torch.float32)
    results = []
    for recompute in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _step(model, "fused", recompute)
        results.append(_grads(model))
    for name, g in results[0].items():
        assert torch.equal(results[1][name], g), name


def test_gradients_accumulate_over_two_backward_calls():
    model = _model(sharing="attention")
    reference = _twin(model)
    for seed, zero in ((0, True), (3, False)):
        _step(reference, "autograd", batch=_batch(seed), zero=zero)
        _step(model, "fused", batch=_batch(seed), zero=zero)
    assert_grads_close(model, reference, 1e-12, "accumulated")


def test_recomputed_loop_supports_retain_graph_and_the_recorded_one_refuses_clearly():
    model = _model()
    args, kwargs = _batch()
    _step(model, "fused", True)
    once = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = model(*args, **kwargs).loss
    loss.backward(retain_graph=True)
    loss.backward()
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, 2 * once[name], 1e-12, name, floor=1.0)
    set_layer_loop(model, "fused", recompute=False)
    loss = model(*args, **kwargs).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_frozen_parameters_and_an_input_without_grad():
    """Frozen embeddings (the loop's input needs no grad) and a frozen layer weight: None where the
    plain loop has None, equal gradients elsewhere."""
    model = _model()
    reference = _twin(model)
    for m in (model, reference):
        for p in m.albert.embeddings.parameters():
            p.requires_grad_(False)
        m.albert.encoder.embedding_hidden_mapping_in.requires_grad_(False)
        m.albert.encoder.albert_layer_groups[0].albert_layers[1].attention.query.weight.requires_grad_(False)
    _step(reference, "autograd")
    _step(model, "fused", True)
    assert_grads_close(model, reference, 1e-12, "frozen", every_parameter=False)
    assert model.albert.encoder.albert_layer_groups[0].albert_layers[1].attention.query.weight.grad is None


def test_float32_buffer_for_bfloat16_gradients():
    """Three bfloat16 contributions 1, 2^-9, 2^-9, 2^-9 per element (backward order): bfloat16
    accumulation rounds 1 + 2^-9 back to 1 every time; a float32 buffer sums to 1 + 3 * 2^-9 and
    rounds once to 1 + 2^-7 (the nearest bfloat16). The plain autograd loop shows the other value."""
    w = torch.zeros(5, dtype=torch.bfloat16, requires_grad=True)
    scales = [2.0 ** -9, 2.0 ** -9, 2.0 ** -9, 1.0]  # step i adds w * scales[i]; dL/dw_i = scales[i]

    def run(scale):
        return lambda x: x + w * scale

    steps = [(run(s), [w]) for s in scales]
    x = torch.zeros(5, dtype=torch.bfloat16, requires_grad=True)
    shared_loop.run_layers(x, steps).sum().backward()
    fused = w.grad.clone()
    w.grad = None
    y = x
    for step, _ in steps:
        y = step(y)
    y.sum().backward()
    assert fused.dtype == torch.bfloat16
    assert torch.equal(fused, torch.full_like(fused, 1 + 2.0 ** -7))
    assert torch.equal(w.grad, torch.ones_like(fused))  # what bfloat16 accumulation gives


def test_bfloat16_model_gradients_are_summed_in_float32():
    """A shared bfloat16 layer's gradient equals the float32 sum (backward order, one rounding) of
    the per-step gradients, read off the unshared model with the same weights in every step."""
    config = {"num_hidden_layers": 6, "num_hidden_groups": 1, "inner_group_num": 1}
    shared = _model(torch.bfloat16, **config)
    unshared = _model(torch.bfloat16, sharing="none", **config)
    state = {k: v for k, v in shared.state_dict().items() if "albert_layer_groups" not in k}
    layer = shared.albert.encoder.albert_layer_groups[0].albert_layers[0].state_dict()
    for step in range(6):
        state.update({f"albert.encoder.albert_layer_groups.{step}.albert_layers.0.{k}": v for k, v in layer.items()})
    unshared.load_state_dict(state)
    _step(unshared, "autograd")
    _step(shared, "fused")
    steps = [dict(unshared.albert.encoder.albert_layer_groups[s].albert_layers[0].named_parameters())
             for s in range(6)]
    differs_from_bf16_sum = False
    for name, p in shared.albert.encoder.albert_layer_groups[0].albert_layers[0].named_parameters():
        contributions = [steps[s][name].grad for s in reversed(range(6))]
        fp32 = contributions[0].float()
        bf16 = contributions[0]
        for c in contributions[1:]:
            fp32, bf16 = fp32 + c.float(), bf16 + c
        assert torch.equal(p.grad, fp32.to(torch.bfloat16)), name
        differs_from_bf16_sum |= not torch.equal(p.grad, bf16)
    assert differs_from_bf16_sum  # the check above tells the two accumulations apart


def test_which_loop_runs(monkeypatch):
    """"auto": fused only while training with grad; "fused": whenever a gradient is needed (eval
    too), never under no_grad; "autograd": never."""
    model = _model()
    seen = _encoder_node(model)
    args, _ = _batch()
    calls = []
    real = shared_loop._LayerLoop.apply
    monkeypatch.setattr(shared_loop._LayerLoop, "apply", lambda *a: calls.append(1) or real(*a))
    runs = [("auto", True, True, True), ("auto", True, False, False), ("auto", False, True, False),
            ("fused", False, True, True), ("fused", True, False, False), ("autograd", True, True, False)]
    for loop, training, grad, fused in runs:
        set_layer_loop(model.train(training), loop)
        with torch.set_grad_enabled(grad):
            model(*args)
        assert (seen[-1] == "_LayerLoopBackward") == fused, (loop, training, grad)
    assert len(calls) == 2


def test_bad_loop_settings_name_the_argument():
    model = _model()
    with pytest.raises(ValueError, match="loop"):
        set_layer_loop(model, "reentrant")
    with pytest.raises(TypeError, match="recompute"):
        set_layer_loop(model, "fused", recompute="yes")
    model.albert.encoder.loop = "fast"
    with pytest.raises(ValueError, match="loop"):
        model(*_batch()[0])


@pytest.mark.slow
def test_compiled_training_step_traces_the_plain_loop():
    """fullgraph compile of a training forward (the fused loop would break the graph: the encoder
    runs the plain loop while compiling), gradients equal to eager."""
    model = models.AlbertModel(models.AlbertConfig(**{**SIZES, **EXTRA["albert"], "num_hidden_layers": 2,
                                                      "num_hidden_groups": 1, "inner_group_num": 1}))
    randomize_(model)
    reference = models.AlbertModel(model.config)
    reference.load_state_dict(model.state_dict())
    args, _ = _batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for m, fn in ((model, compiled), (reference, reference)):
        out = fn(*args)
        (out.last_hidden_state.square().sum() + out.pooler_output.sum()).backward()
    assert_grads_close(model, reference, 1e-5, "compiled")


# --- DDP ------------------------------------------------------------------------------------------
DDP_RUNS = [("all", False), ("all", True), ("ffn", False)]


def _ddp_batch(step: int):
    """4 rows, exactly 2 labelled tokens per row: each rank's half has as many labelled tokens, so
    the mean of the two ranks' mean losses is the mean loss of the whole batch."""
    ids, mask, types = ragged_batch("albert", seed=10 + step)
    labels = torch.full_like(ids, -100)
    labels[:, :2] = ids[:, :2]  # every row has >= 2 real tokens
    return ids, mask, types, labels, torch.tensor([0, 1, 1, 0]) if step else SOP


def _train(model, rows, steps=2):
    """``steps`` SGD steps on ``rows`` of each step's batch; the gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for step in range(steps):
        ids, mask, types, labels, sop = (t[rows] for t in _ddp_batch(step))
        model(ids, mask, types, labels=labels, sentence_order_label=sop).loss.backward()
        module = model.module if hasattr(model, "module") else model
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grads


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for sharing, recompute in DDP_RUNS:
            model = set_layer_loop(_model(sharing=sharing), "fused", recompute)
            ddp = DistributedDataParallel(model)
            grads = _train(ddp, slice(2 * rank, 2 * rank + 2))
            torch.save(grads, os.path.join(out_dir, f"{sharing}-{recompute}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_whole_batch():
    """2 gloo ranks x 2 rows, DistributedDataParallel, the fused loop (graph and recompute): two SGD
    steps without DDP's "marked ready twice" error, each rank's averaged gradients equal to one
    process's plain loop on all 4 rows."""
    mp = pytest.importorskip("torch.multiprocessing")
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_ddp_worker, args=(2, init_file, out_dir), nprocs=2, join=True)
        for sharing, recompute in DDP_RUNS:
            expected = _train(set_layer_loop(_model(sharing=sharing), "autograd"), slice(0, 4))
            for rank in range(2):
                actual = torch.load(os.path.join(out_dir, f"{sharing}-{recompute}-{rank}.pt"))
                for step, (a, e) in enumerate(zip(actual, expected)):
                    assert set(a) == set(e)
                    largest = max(g.abs().max() for g in e.values()).item()
                    for name in e:
                        assert_rel_close(a[name], e[name], 1e-10, f"rank {rank} step {step} {name}", floor=largest)


# --- GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recompute", [False, True], ids=["graph", "recompute"])
def test_fused_loop_is_captured_in_a_cuda_graph(recompute):
    """The encoder's forward + backward through the fused loop, captured once and replayed on new
    inputs: gradients equal an eager run's (dropout 0: recomputation needs no generator rewinding).
    Only the encoder: the loss ops read label values on the host."""
    encoder = _model(torch.float32).albert.encoder.cuda()
    set_layer_loop(encoder, "fused", recompute)
    g = torch.Generator().manual_seed(0)
    _, mask, _ = ragged_batch("albert")
    static_mask = mask.bool().cuda()
    static_x = torch.randn(*mask.shape, SIZES["hidden_size"], generator=g).cuda().requires_grad_()
    probe = torch.randn(*mask.shape, SIZES["hidden_size"], generator=g).cuda()

    def step():
        loss = (encoder(static_x, static_mask) * probe).sum()
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    leaves = [static_x] + [p for p in encoder.parameters() if p.grad is not None]  # the E -> H mapping is unused here
    with torch.no_grad():
        static_x.copy_(torch.randn(static_x.shape, generator=g))
        for t in leaves:
            t.grad.zero_()
    graph.replay()
    captured = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    set_layer_loop(encoder, "autograd")
    eager = step()
    assert_rel_close(static_loss, eager.detach(), 1e-5, "loss")
    for c, t in zip(captured, leaves):
        assert_rel_close(c, t.grad, 1e-5, "grad", floor=1.0)

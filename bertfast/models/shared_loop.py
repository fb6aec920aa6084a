"""A stack of layer applications with shared weights as ONE autograd node (ALBERT's layer loop).

Plain autograd sees ALBERT's shared layer applied L times as L uses of each shared parameter: it
keeps L gradient contributions and sums them in the parameter's dtype (bfloat16 sums round L
times), and a wrapper that hooks every use of a parameter (DDP's reducer, activation checkpointing)
can see it more than once. ``run_layers`` instead runs the steps inside one
``torch.autograd.Function`` whose inputs are the hidden states and the flat list of the distinct
parameters, so autograd and DDP see each parameter's gradient exactly once, from this node:

    forward   x_0 = hidden;  x_{i+1} = step_i(x_i)                      (i = 0 .. S-1)
    backward  g_S = dL/dx_S;  for i = S-1 .. 0:
                  (g_i, dW_i) = vjp of step_i at x_i applied to g_{i+1}
                  acc[W] += dW_i   for each parameter W that step_i reads
              dL/dW = acc[W] cast to W's dtype (None when no step produced one)

``acc[W]`` is one buffer per parameter, allocated at its first contribution of a backward, in
float32 (float64 for float64 parameters): a bfloat16 parameter's L contributions are summed before
a single rounding.

Activations: by default each step's autograd graph is recorded in the forward and replayed by
``torch.autograd.grad`` in the backward (the memory of the plain loop). With ``recompute=True``
only each step's input is kept and the step is re-run in the backward under the forward's autocast
state and, when the steps draw random numbers (dropout), the forward's generator state, so the
same dropout masks are drawn again (the ops draw their dropout seeds from torch's generator).

CUDA graphs: neither pass reads a tensor value on the host (no ``.item()``, no branch on data;
buffers are allocated by a fixed schedule), so the loop can be captured. The one exception is
``recompute=True`` with ``draws_random=True``: rewinding the CUDA generator is refused during a
capture (the error says so). Under ``torch.compile`` call the layers directly instead (the
callers do: compile traces the shared weights itself and cannot trace ``autograd.grad`` inside a
backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

Step = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Plan:
    """What the autograd node needs besides tensors: the steps, and for each the indices of the
    parameters it reads (into the node's flat parameter list)."""

    runs: tuple[Step, ...]
    reads: tuple[tuple[int, ...], ...]
    recompute: bool
    draws_random: bool


def run_layers(hidden: torch.Tensor, steps: Sequence[tuple[Step, Sequence[torch.Tensor]]], *,
               recompute: bool = False, draws_random: bool = True) -> torch.Tensor:
    """``hidden`` through ``steps`` in order, as one autograd node.

    Args:
        hidden: the input of the first step (any shape the steps take).
        steps: (run, params) per step: ``run(x) -> y`` (y has x's shape and dtype), and every
            parameter ``run`` reads. A parameter may appear in any number of steps; its gradient
            is accumulated across them.
        recompute: keep only each step's input and re-run the step in the backward.
        draws_random: whether a step draws from torch's generator (dropout): with ``recompute``
            the generator state before each step is kept and restored for its re-run.

    Returns:
        The output of the last step. Without grad mode, or when neither ``hidden`` nor any
        parameter requires grad, the steps simply run one after another.
    """
    flat: list[torch.Tensor] = []
    index: dict[int, int] = {}
    reads = []
    for _, params in steps:
        mine = []
        for p in params:
            if id(p) not in index:
                index[id(p)] = len(flat)
                flat.append(p)
            if index[id(p)] not in mine:
                mine.append(index[id(p)])
        reads.append(tuple(mine))
    if not torch.is_grad_enabled() or not (hidden.requires_grad or any(p.requires_grad for p in flat)):
        for run, _ in steps:
            hidden = run(hidden)
        return hidden
    plan = _Plan(tuple(run for run, _ in steps), tuple(reads), bool(recompute), bool(draws_random))
    return _LayerLoop.apply(plan, hidden, *flat)


class _LayerLoop(torch.autograd.Function):
    """forward(plan, hidden, *params) -> last step's output. See the module docstring."""

    @staticmethod
    def forward(ctx, plan: _Plan, hidden: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.plan = plan
        ctx.params = params
        if plan.recompute:
            inputs, rng_states = [], []
            x = hidden
            for run in plan.runs:  # grad mode is off inside Function.forward
                inputs.append(x)
                if plan.draws_random:
                    rng_states.append(_rng_state(x.device))
                x = run(x)
            ctx.rng_states = rng_states
            ctx.autocast = _autocast_state(hidden.device)
            ctx.save_for_backward(*inputs)  # version-checked: an in-place change of hidden is caught
            return x
        graphs = []
        x = hidden.detach()
        with torch.enable_grad():
            for run in plan.runs:
                x_in = x.detach().requires_grad_()
                x = run(x_in)
                graphs.append((x_in, x))
        ctx.graphs = graphs
        return x.detach()  # the node's output; the step's graph stays in ctx.graphs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        plan, params = ctx.plan, ctx.params
        if plan.recompute:
            inputs = ctx.saved_tensors  # raises autograd's own error after a freed graph
            graphs = None
        else:
            graphs, ctx.graphs = ctx.graphs, None
            if graphs is None:
                raise RuntimeError("bertfast shared layer loop: backward ran twice through the same forward "
                                   "(retain_graph=True); its recorded graphs are freed by the first backward. "
                                   "Use loop='autograd' or recompute=True for repeated backward passes")
        wants = [ctx.needs_input_grad[2 + k] for k in range(len(params))]
        acc: list[torch.Tensor | None] = [None] * len(params)
        for i in reversed(range(len(plan.runs))):
            need_x = i > 0 or ctx.needs_input_grad[1]
            ks = [k for k in plan.reads[i] if wants[k]]
            if not need_x and not ks:
                continue
            if graphs is not None:
                x_in, y = graphs[i]
                graphs[i] = None  # drop the step's graph as soon as it is replayed
            else:
                x_in, y = _rerun(ctx, i, inputs[i], need_x)
            targets = ([x_in] if need_x else []) + [params[k] for k in ks]
            grads = torch.autograd.grad(y, targets, grad, allow_unused=True)
            if need_x:
                grad = grads[0] if grads[0] is not None else torch.zeros_like(x_in)
                grads = grads[1:]
            for k, g in zip(ks, grads):
                if g is None:
                    continue
                if acc[k] is None:
                    # A copy: autograd may hand the same tensor as another gradient (e.g. of an add).
                    acc[k] = g.to(torch.promote_types(g.dtype, torch.float32), copy=True)
                else:
                    acc[k].add_(g)
        param_grads = [None if a is None else a.to(p.dtype) for a, p in zip(acc, params)]
        return (None, grad if ctx.needs_input_grad[1] else None, *param_grads)


def _rerun(ctx, i: int, x_saved: torch.Tensor, need_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``i`` again on its saved input, with the forward's generator and autocast states."""
    plan = ctx.plan
    x_in = x_saved.detach().requires_grad_(need_x)
    with contextlib.ExitStack() as stack:
        if plan.draws_random:
            stack.enter_context(_rng_restored(x_saved.device, ctx.rng_states[i]))
        for device_type, enabled, dtype, cache in ctx.autocast:
            stack.enter_context(torch.autocast(device_type, enabled=enabled, dtype=dtype, cache_enabled=cache))
        stack.enter_context(torch.enable_grad())
        y = plan.runs[i](x_in)
    return x_in, y


def _refuse_capture(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("bertfast shared layer loop: recompute=True with dropout cannot be captured in a CUDA "
                           "graph (the CUDA generator cannot be rewound during a capture); capture with "
                           "recompute=False, or with dropout 0")


def _rng_state(device: torch.device) -> torch.Tensor:
    """The generator state the ops of ``device`` draw their dropout seeds from (a host-side copy:
    no device synchronisation)."""
    _refuse_capture(device)
    if device.type == "cpu":
        return torch.get_rng_state()
    return getattr(torch, device.type).get_rng_state(device)


@contextlib.contextmanager
def _rng_restored(device: torch.device, state: torch.Tensor):
    """Run with ``device``'s generator at ``state``; the generator is put back afterwards, so a
    recomputation draws the forward's numbers without shifting anyone else's."""
    _refuse_capture(device)
    accelerator = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=accelerator, device_type=device.type if accelerator else "cuda"):
        if device.type == "cpu":
            torch.set_rng_state(state)
        else:
            getattr(torch, device.type).set_rng_state(state, device)
        yield


def _autocast_state(device: torch.device) -> list[tuple[str, bool, torch.dtype, bool]]:
    """(device type, enabled, dtype, cache) for the CPU and ``device``'s type, as the forward ran."""
    types = ["cpu"] + ([device.type] if device.type != "cpu" else [])
    cache = torch.is_autocast_cache_enabled()
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t), cache)
            for t in types if torch.amp.is_autocast_available(t)]

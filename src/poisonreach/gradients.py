"""Model gradients as explicit sums over chunks of data.

g(µ) and g(ν̂) (equation (3)) are means of per-sample gradients ∇_w ℓ(z; w). They are computed here
as *sums* over chunks plus a count, so that a data-parallel job (:mod:`poisonreach.distributed`) only
has to all-reduce the sums; nothing holds more than one chunk's graph. The chunks' sums are added in
float64 (and all-reduced in float64 with ``all_reduce``): a rank holding whole chunks of the
single-process grid then returns the single-process sum, to the order of float64 additions.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from . import distributed
from .errors import PoisonReachError
from .models import last_linear
from .validation import evaluating

Params = Sequence[Tensor]

PARAMETER_SETS = ("all", "last", "first")


def select_parameters(model: nn.Module, which: str = "all") -> list[nn.Parameter]:
    """The parameters whose gradient the attack cancels.

    ``all``: every trainable parameter (the paper's g(w), Definition 1); ``last``: the last linear
    layer's weight and bias (the necessary condition (14) of Theorem 4); ``first``: the first
    parameter tensor only, which is what the official GC code cancels.
    """
    if which == "all":
        params = [p for p in model.parameters() if p.requires_grad]
    elif which == "last":
        params = list(last_linear(model).parameters())
    elif which == "first":
        params = [next(model.parameters())]
    else:
        raise PoisonReachError(f"parameters must be one of {list(PARAMETER_SETS)}, got {which!r}")
    if not params:
        raise PoisonReachError("the model has no trainable parameters to attack")
    return params


def chunks(n: int, size: int):
    """Consecutive slices of at most ``size`` rows covering range(n)."""
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def gradient_sum(
    model: nn.Module,
    params: Params,
    X: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    chunk_size: int,
    device: torch.device,
    all_reduce: bool = False,
) -> list[Tensor]:
    """Σ_z ∇_w ℓ(z; w) over the rows of (X, y), chunk by chunk, without keeping a graph; with
    ``all_reduce``, also over the ranks' rows (every rank passes its own)."""
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for sl in chunks(len(X), chunk_size):
        losses = loss_fn(model(X[sl].to(device)), y[sl].to(device))
        for acc, g in zip(total, torch.autograd.grad(losses.sum(), params)):
            acc += g
    return _finish(total, params, all_reduce)


def _finish(total: list[Tensor], params: Params, all_reduce: bool) -> list[Tensor]:
    """float64 sums (all-reduced when asked) in the parameters' dtypes."""
    if all_reduce:
        distributed.all_reduce(total)
    return [t.to(p.dtype) for t, p in zip(total, params)]


class Bracket(NamedTuple):
    """What one pass of :func:`cancel_gradient` returns for the rows z_j of (X, y)."""

    values: Tensor  # ⟨∇_w ℓ(z_j; w), v⟩ per row
    x: Tensor  # ∇_{x_j} ⟨∇_w ℓ(z_j; w), v⟩, shaped like X
    y: Tensor | None  # ∇_{y_j} ⟨∇_w ℓ(z_j; w), v⟩ for (probability) labels, when asked for


def cancel_gradient(
    model: nn.Module,
    params: Params,
    X: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    v: Params,
    *,
    chunk_size: int,
    device: torch.device | None = None,
    with_labels: bool = False,
) -> Bracket:
    """∇_{z_j} ⟨∇_w ℓ(z_j; w), v⟩ for every row z_j, with v held fixed (the bracket of equation (19)),
    with the per-row values ⟨∇_w ℓ(z_j; w), v⟩ (the objective of Frank–Wolfe's subproblem (B.5)).

    Per chunk, the values are the derivative of ℓ(z_j; w + t·v) in t at 0 (:func:`directional_losses`,
    forward mode in w), and one backward pass of their sum gives the bracket in x_j (and y_j): row j
    depends on z_j alone, the model being in eval mode. Rows are moved to ``device`` chunk by chunk
    (None: X's device), and so are the results.
    """
    device = X.device if device is None else device
    values = torch.empty(len(X), dtype=X.dtype, device=device)
    gx = torch.empty(X.shape, dtype=X.dtype, device=device)
    gy = torch.empty(y.shape, dtype=y.dtype, device=device) if with_labels else None
    for sl in chunks(len(X), chunk_size):
        xc = X[sl].to(device).detach().requires_grad_(True)
        yc = y[sl].to(device).detach().requires_grad_(with_labels)
        rows = directional_losses(model, params, v, xc, yc, loss_fn)
        inputs = (xc, yc) if with_labels else (xc,)
        # allow_unused: a chunk whose loss is constant in x has no path to it
        outs = torch.autograd.grad(rows.sum(), inputs, allow_unused=True)
        values[sl] = rows.detach()
        for out, part in zip((gx, gy), outs):
            out[sl] = 0.0 if part is None else part.detach()
    return Bracket(values, gx, gy)


def directional_losses(
    model: nn.Module, params: Params, v: Params, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """⟨∇_w ℓ(x_j, y_j; w), v⟩ for every row, differentiable in x and y (a graph is kept).

    Forward mode: the logits o_j and their tangent ȯ_j = (∂o_j/∂w)·v come from one dual-number pass
    of the model with w + t·v, and the row's value is ⟨∂ℓ/∂o_j, ȯ_j⟩. This needs no gradient with
    respect to w: on the MNIST CNN (one thread, chunks of 128) the bracket took 0.70 of the time of
    the double backward it replaces, which computes every layer's weight gradient to differentiate
    it. A model with an operation that has no forward-mode formula (a custom ``autograd.Function``
    without ``jvp``) falls back to that double backward: a seed a = 1 on the first backward's
    outputs, ⟨Σ_j a_j ∇_w ℓ(z_j), v⟩, has derivative ⟨∇_w ℓ(z_j), v⟩ in a_j.
    """
    try:
        with fwAD.dual_level():
            logits, tangent = fwAD.unpack_dual(functional_call(model, _duals(model, params, v), (x,)))
    except NotImplementedError:
        seed = torch.ones(len(x), dtype=x.dtype, device=x.device, requires_grad=True)
        grads = torch.autograd.grad(loss_fn(model(x), y), params, grad_outputs=seed, create_graph=True)
        (rows,) = torch.autograd.grad(inner(grads, v), seed, create_graph=True)
        return rows
    if tangent is None:  # the logits do not depend on the parameters along v
        return torch.zeros(len(x), dtype=x.dtype, device=x.device)
    losses = loss_fn(logits, y)
    (dloss,) = torch.autograd.grad(losses.sum(), logits, create_graph=True)
    return (dloss * tangent).flatten(1).sum(1)


def _duals(model: nn.Module, params: Params, v: Params) -> dict[str, Tensor]:
    """The parameters ``params`` as dual numbers w + t·v, by name, for ``functional_call``; the
    primal is detached: nothing here differentiates with respect to w."""
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise PoisonReachError(f"parameters {missing} are not parameters of the model: pass the model's own")
    return {names[id(p)]: fwAD.make_dual(p.detach(), t.detach().to(p.dtype)) for p, t in zip(params, v)}


def gradient_jvp(
    model: nn.Module,
    params: Params,
    X: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    D: Tensor,
    *,
    chunk_size: int,
    device: torch.device | None = None,
    all_reduce: bool = False,
) -> list[Tensor]:
    """Σ_j (∂/∂x_j ∇_w ℓ(x_j, y_j; w))·d_j: the change of the gradient sum Σ_j ∇_w ℓ(z_j; w) when
    every row x_j moves along d_j (the rows of D, shaped like X), to first order. This is the
    Jacobian–vector product of GC's residual (up to its factor ε_d/m), the transpose of
    :func:`cancel_gradient`'s bracket.

    Mixed partial derivatives commute, so Jd = ∇_w Σ_j ⟨∇_x ℓ(x_j), d_j⟩: forward mode in x (a
    dual-number pass of the model on x + t·D gives the logits' tangent ȯ_j), then one backward pass
    of Σ_j ⟨∂ℓ/∂o_j, ȯ_j⟩ to w. A model without forward-mode formulas falls back to reverse mode
    only: the bracket b(u) = ∇_x⟨∇_w ℓ, u⟩ is linear in u, so Jd = ∇_u ⟨b(u), D⟩ at u = 0 (three
    backward passes). ``all_reduce``: the sum also runs over the ranks' rows."""
    device = X.device if device is None else device
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for sl in chunks(len(X), chunk_size):
        # allow_unused: a parameter whose gradient does not depend on x has no path to the result
        for acc, t in zip(total, _chunk_jvp(model, params, X[sl].to(device), y[sl].to(device), loss_fn, D[sl].to(device))):
            if t is not None:
                acc += t
    return _finish(total, params, all_reduce)


def _chunk_jvp(model, params, x: Tensor, y: Tensor, loss_fn, d: Tensor) -> Sequence[Tensor | None]:
    """One chunk's term of :func:`gradient_jvp`."""
    x = x.detach()
    try:
        with fwAD.dual_level():
            logits, tangent = fwAD.unpack_dual(model(fwAD.make_dual(x, d.to(x.dtype))))
    except NotImplementedError:
        x.requires_grad_(True)
        grads = torch.autograd.grad(loss_fn(model(x), y).sum(), params, create_graph=True)
        u = [torch.zeros_like(p, requires_grad=True) for p in params]
        (bracket,) = torch.autograd.grad(inner(grads, u), x, create_graph=True)
        return torch.autograd.grad((bracket * d).sum(), u, allow_unused=True)
    if tangent is None:  # the logits do not depend on x
        return [None] * len(params)
    (dloss,) = torch.autograd.grad(loss_fn(logits, y).sum(), logits, create_graph=True)
    return torch.autograd.grad((dloss * tangent).sum(), params, allow_unused=True)


def inner(a: Params, b: Params, *, dtype: torch.dtype | None = None) -> Tensor:
    """⟨a, b⟩ of two lists of tensors taken as one vector each, computed in ``dtype`` when given
    (float64 where many terms are summed)."""
    if dtype is not None:
        a, b = [t.to(dtype) for t in a], [t.to(dtype) for t in b]
    return sum((s * t).sum() for s, t in zip(a, b))


def flat_norm(tensors: Params) -> float:
    """The L2 norm of a list of tensors taken as one vector."""
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors)))


def per_sample_gradients(
    model: nn.Module,
    params: Params,
    X: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    chunk_size: int,
    device: torch.device,
):
    """Yield ∇_w ℓ(z_i; w) for the rows of (X, y), one (chunk, P) block per chunk of ``chunk_size`` rows.

    Each row is the per-sample gradient with respect to ``params`` (parameters of ``model``),
    flattened and concatenated in their order; P is their total size. The blocks come from
    ``torch.func.vmap(torch.func.grad(·))`` over a functional call of the model, each sample seen as a
    batch of one, with the model in eval mode: batch-norm uses its running statistics, so no sample's
    gradient depends on the others (and dropout is off). Only one chunk's gradients exist at a time;
    the model's modes are restored between blocks. The blocks carry no autograd graph. A custom
    ``loss_fn`` must work under ``torch.func.vmap`` (no data-dependent Python control flow).
    """
    by_id = {id(p): name for name, p in model.named_parameters()}
    if any(id(p) not in by_id for p in params):
        raise PoisonReachError("params must be parameters of model: select them with select_parameters(model, ...)")
    names = [by_id[id(p)] for p in params]

    def sample_loss(values, x, target):
        out = functional_call(model, dict(zip(names, values)), (x.unsqueeze(0),))
        return loss_fn(out, target.unsqueeze(0)).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    values = tuple(p.detach() for p in params)
    for sl in chunks(len(X), chunk_size):
        # no_grad: the parameters left out of ``params`` would otherwise tie a graph to the result
        with evaluating(model), torch.no_grad():
            grads = per_sample(values, X[sl].to(device), y[sl].to(device))
        yield torch.cat([g.reshape(len(g), -1) for g in grads], dim=1)


def hessian_vector_products(
    model: nn.Module,
    params: Params,
    X: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    V: Tensor | None,
    *,
    chunk_size: int,
    device: torch.device,
    block_size: int | None = None,
) -> Tensor:
    """Σ_z ∇²_w ℓ(z; w)·v over the rows z of (X, y), for every row v of V (k, P): the Hessian of the
    summed loss with respect to ``params`` times each vector, as rows (k, P) laid out like
    :func:`flatten` of ``params``. V = None stands for the identity: the dense P × P Hessian, built
    without a P × P identity in memory.

    These are the products TGDA's conjugate gradient needs for its total gradient and the influence
    defense for (H + λI)⁻¹g (Koh & Liang 2017). Double backprop (Pearlmutter 1994), one chunk of
    ``chunk_size`` rows at a time: a chunk's forward and first backward serve all k vectors, the
    second backward is batched over ``block_size`` of them at once (``is_grads_batched``; None: all
    k), so memory holds one chunk's graph times ``block_size`` vectors. The model is in eval mode
    (batch-norm running statistics, no dropout), so that the chunked sums are exact; its modes are
    restored afterwards. A parameter the gradient does not depend on has a zero Hessian block.
    """
    sizes = [p.numel() for p in params]
    if V is not None and (V.dim() != 2 or V.shape[1] != sum(sizes)):
        raise PoisonReachError(
            f"V must hold one vector per row, shape (k, {sum(sizes)}) for these parameters, got {tuple(V.shape)}: "
            "flatten the vectors with poisonreach.gradients.flatten"
        )
    like = params[0] if V is None else V
    k = sum(sizes) if V is None else len(V)
    out = torch.zeros(k, sum(sizes), dtype=like.dtype, device=like.device)
    with evaluating(model):
        for sl in chunks(len(X), chunk_size):
            losses = loss_fn(model(X[sl].to(device)), y[sl].to(device))
            # allow_unused, and dropping constant gradients below: an unused or linear parameter
            # has a zero Hessian row, which the second backward could not differentiate
            grads = torch.autograd.grad(losses.sum(), params, create_graph=True, allow_unused=True)
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not used:
                continue
            for rows in chunks(k, block_size or max(k, 1)):
                if V is None:
                    T = torch.zeros(rows.stop - rows.start, k, dtype=out.dtype, device=out.device)
                    T[:, rows].fill_diagonal_(1.0)  # the basis vectors e_j, j in rows
                else:
                    T = V[rows]
                # one vector needs no vmap over the backward, whose overhead dominates for small models
                batched = len(T) > 1
                lead = (len(T),) if batched else ()
                tangents = [t.reshape(*lead, *p.shape) for t, p in zip(T.split(sizes, dim=1), params)]
                # retain_graph: the chunk's graph serves every block; allow_unused: a parameter no
                # gradient depends on has a zero block (materialize_grads would drop the batch dimension)
                hv = torch.autograd.grad(
                    [grads[i] for i in used], params, grad_outputs=[tangents[i] for i in used],
                    is_grads_batched=batched, retain_graph=True, allow_unused=True,
                )
                out[rows] += torch.cat([T.new_zeros(len(T), n) if h is None else h.reshape(len(T), -1) for h, n in zip(hv, sizes)], dim=1)
    return out


def conjugate_gradient(apply, B: Tensor, *, iterations: int, tolerance: float = 0.0, truncate: bool = False) -> tuple[Tensor, int]:
    """Solve A x_i = b_i for every row b_i of B, A symmetric positive definite given as ``apply``
    (rows ↦ rows), by conjugate gradient with one recurrence per row (Hestenes & Stiefel 1952).

    A row stops once ‖A x_i − b_i‖ ≤ tolerance·‖b_i‖; returns the solutions and how many rows had
    not stopped after ``iterations`` iterations. A direction of non-positive curvature raises a
    PoisonReachError, or with ``truncate`` stops that row as truncated Newton–CG does (Nocedal and
    Wright 2006, Algorithm 7.1): it keeps its iterate, or b_i itself when that happens at the first
    step (A taken as the identity).
    """
    x = torch.zeros_like(B)
    r = B.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    goal = tolerance**2 * rr
    active = rr > goal
    for step in range(iterations):
        if not active.any():
            break
        ap = torch.zeros_like(p)
        ap[active] = apply(p[active])  # stopped rows cost nothing
        curvature = (p * ap).sum(1)
        bent = active & (curvature <= 0)
        if bent.any():
            if not truncate:
                raise PoisonReachError(
                    "H + damping·I is not positive definite (CG met a direction of non-positive curvature): "
                    "raise damping or use parameters='last'"
                )
            if step == 0:
                x[bent] = B[bent]
            active &= ~bent
        one = torch.ones_like(rr)
        alpha = torch.where(active, rr / curvature.where(active, one), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rr_new = (r * r).sum(1)
        p = r + torch.where(active, rr_new / rr.where(active, one), 0.0)[:, None] * p
        rr = rr_new
        active &= rr > goal
    return x, int(active.sum())


def flatten(tensors: Params) -> Tensor:
    """A list of tensors as one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Params) -> list[Tensor]:
    """The inverse of :func:`flatten`, shaped like the tensors of ``like``."""
    return [part.view_as(t) for part, t in zip(vector.split([t.numel() for t in like]), like)]

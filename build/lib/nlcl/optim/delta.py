"""The paper's "more expressive" momentum rules and DGD, as outer optimizers (paper §4.4–4.5).

Sign convention as in the paper: the momentum m accumulates the negative gradient and W <- W + m.

- `DeltaMomentum` (Eq. 49): m <- m (alpha I - g^T g) - lr g, then W <- W + m.
- `DMGD` (Eq. 50): the momentum is a small MLP memory m(.), trained by GD on its own objective;
  W <- W + m(g).
- `DGDOuter` (Eq. 57): W <- W (I - eta' x x^T) - eta' grad for nn.Linear weights, with the layer
  input x taken from a forward hook.

None of these has a reported experiment in the paper; the concrete choices are documented per class.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a parameter as (outputs, inputs): vectors as one row, >2-D tensors flattened after dim 0."""
    return t.reshape(1, -1) if t.ndim < 2 else t.reshape(t.shape[0], -1)


def delta_momentum_update(m: torch.Tensor, g: torch.Tensor, alpha: float, lr: float,
                          eps: float = 1e-12) -> torch.Tensor:
    """m (alpha I - g_hat^T g_hat) - lr g, with g_hat = g / ||g||_F, on the (outputs, inputs) view.

    Dimensions: for W of shape (out, in) the momentum m has W's shape, so the decay must act on the
    input side: g^T g is (in, in) and multiplies m from the right (the arXiv form; the NeurIPS
    left-multiplication only type-checks for square W). The gradient is normalised so that the Gram
    term is dimensionless with spectral norm <= 1: for a rank-1 gradient u x^T it is the projector
    x x^T / ||x||^2, so with alpha = 1 the memory first erases what it stored along x, then writes
    -lr g (a delta rule over past gradients).
    """
    M, G = _as_matrix(m), _as_matrix(g)
    G_hat = G / (torch.linalg.matrix_norm(G) + eps)
    # associate so that the Gram matrix formed is the smaller one
    erased = (M @ G_hat.mT) @ G_hat if M.shape[0] <= M.shape[1] else M @ (G_hat.mT @ G_hat)
    return (alpha * M - erased - lr * G).reshape(m.shape)


class DeltaMomentum(torch.optim.Optimizer):
    """Delta Momentum (paper Eq. 49) with P_i = I. alpha is the momentum's retention."""

    def __init__(self, params, lr: float = 1e-3, alpha: float = 0.9, weight_decay: float = 0.0,
                 eps: float = 1e-12):
        super().__init__(params, dict(lr=lr, alpha=alpha, weight_decay=weight_decay, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                m = state.get("momentum", torch.zeros_like(p))
                m = delta_momentum_update(m, p.grad, group["alpha"], group["lr"], group["eps"])
                state["momentum"] = m
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(m)
        return loss


# ---- DMGD ----

def dmgd_memory_output(u: torch.Tensor, bias: torch.Tensor, w_in: torch.Tensor, c: torch.Tensor,
                       w_out: torch.Tensor) -> torch.Tensor:
    """m(u) = bias + sum_k w_out[k] tanh(w_in[k] u + c[k]), element-wise over u (flat)."""
    return bias + torch.tanh(u[:, None] * w_in + c) @ w_out


def dmgd_memory_grads(u: torch.Tensor, g: torch.Tensor, w_in: torch.Tensor, c: torch.Tensor,
                      w_out: torch.Tensor):
    """Gradients of the memory's objective L(m) = <m(u), g>, the bias w.r.t. the sum and the shared
    MLP weights w.r.t. the mean over entries (so their step does not grow with the tensor size).

    Returns (d_bias, d_w_in, d_c, d_w_out); d_bias = g, which makes the bias plain momentum.
    """
    a = torch.tanh(u[:, None] * w_in + c)                      # (n, hidden)
    d_pre = g[:, None] * w_out * (1 - a * a)                   # d<out, g>/d pre-activation
    return g, (d_pre * u[:, None]).mean(0), d_pre.mean(0), (g[:, None] * a).mean(0)


class DMGD(torch.optim.Optimizer):
    """Deep Momentum Gradient Descent (paper Eq. 50): W <- W + m_{i+1}(u_i), u_i from g_i.

    The paper leaves m(.) unspecified beyond "an MLP". Our memory, one per parameter tensor, acts
    element-wise on the gradient:

        m(u) = b + sum_k w_out[k] tanh(w_in[k] u + c[k])     u = g / rms(g)  (scale-free input)

    - b (state "momentum") has the parameter's shape; the hidden path (`hidden` units: w_in, c,
      w_out) is shared by all entries of the tensor, so it costs 3 * hidden numbers per tensor.
    - Inner objective (the "dot-product" choice of Eq. 50): L(m) = <m(u), g>. One GD step with
      retention alpha on the output side: b <- alpha b - lr g (exactly heavy-ball momentum),
      w_out <- alpha w_out - memory_lr dL/dw_out; the input side (w_in, c) takes plain GD steps,
      since decaying it would collapse the non-linearity.
    - w_out starts at 0, so DMGD starts as momentum and the hidden path learns a gradient-dependent
      correction; w_in and c start on fixed grids (deterministic, nothing random in the state).
    """

    def __init__(self, params, lr: float = 1e-3, alpha: float = 0.9, hidden: int = 8,
                 memory_lr: float | None = None, weight_decay: float = 0.0, eps: float = 1e-12):
        super().__init__(params, dict(lr=lr, alpha=alpha, hidden=hidden, memory_lr=memory_lr,
                                      weight_decay=weight_decay, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, h = group["lr"], group["alpha"], group["hidden"]
            memory_lr = lr if group["memory_lr"] is None else group["memory_lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["w_in"] = torch.linspace(-2.0, 2.0, h, device=p.device, dtype=p.dtype)
                    state["c"] = torch.linspace(-1.0, 1.0, h, device=p.device, dtype=p.dtype).flip(0)
                    state["w_out"] = torch.zeros(h, device=p.device, dtype=p.dtype)
                g = p.grad.reshape(-1)
                u = g / (g.pow(2).mean().sqrt() + group["eps"])
                momentum = state["momentum"].view(-1)
                d_bias, d_w_in, d_c, d_w_out = dmgd_memory_grads(u, g, state["w_in"], state["c"], state["w_out"])
                momentum.mul_(alpha).sub_(lr * d_bias)
                state["w_out"].mul_(alpha).sub_(memory_lr * d_w_out)
                state["w_in"].sub_(memory_lr * d_w_in)
                state["c"].sub_(memory_lr * d_c)
                update = dmgd_memory_output(u, momentum, state["w_in"], state["c"], state["w_out"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.view_as(p))
        return loss


# ---- DGD as an outer optimizer ----

def dgd_update(W: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, lr: float) -> torch.Tensor:
    """W (I - eta' x x^T) - eta' grad with eta' = lr / (1 + lr ||x||^2) (paper Eq. 57)."""
    eta = lr / (1 + lr * x.pow(2).sum())
    return W - eta * torch.outer(W @ x, x) - eta * grad


class DGDOuter(torch.optim.Optimizer):
    """Delta Gradient Descent as an outer update (paper Eq. 57) for nn.Linear weights.

    The optimizer only sees gradients, but DGD's decay needs the layer input x. `model` (or
    `attach(model)`) registers a forward pre-hook on every nn.Linear whose weight this optimizer
    holds; the hook stores x_bar, the batch mean of the l2-normalised input rows (norm <= 1), and
    sums it over all forwards since the last step (a slow level sees several batches per step).
    The step uses their mean as x, with eta' = lr / (1 + lr ||x||^2) from the exact Sherman–Morrison
    form. Forwards with gradients disabled (evaluation) are ignored. Every other parameter (biases,
    weights of non-Linear modules, Linear weights seen by no forward) takes plain GD: DGD with x = 0.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, model: nn.Module | None = None,
                 eps: float = 1e-12):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, eps=eps))
        self._hooks = []
        if model is not None:
            self.attach(model)

    def attach(self, model: nn.Module) -> None:
        mine = {id(p) for group in self.param_groups for p in group["params"]}
        eps = self.defaults["eps"]
        self_ref = weakref.ref(self)  # the model must not keep the optimizer alive

        def make_hook(weight):
            def record_input(module, args):
                opt = self_ref()
                if opt is None or not torch.is_grad_enabled():
                    return
                x = args[0].detach().reshape(-1, weight.shape[1]).to(weight.dtype)
                x_bar = (x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)).mean(0)
                state = opt.state[weight]
                if "x_sum" in state:
                    state["x_sum"] += x_bar
                    state["x_count"] += 1
                else:
                    state["x_sum"], state["x_count"] = x_bar, 1
            return record_input

        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in mine:
                self._hooks.append(module.register_forward_pre_hook(make_hook(module.weight)))

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                state = self.state[p]
                x_sum, count = state.pop("x_sum", None), state.pop("x_count", 0)
                if p.grad is None:
                    continue
                p.mul_(1 - lr * group["weight_decay"])
                if x_sum is None:
                    p.add_(p.grad, alpha=-lr)
                else:
                    p.copy_(dgd_update(p, p.grad, x_sum / count, lr))
        return loss

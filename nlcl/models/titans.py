"""Titans neural-memory layer (Behrouz et al., arXiv 2501.00663), as a sequence mixer [B, T, d] -> [B, T, d].

The layer is the memory as a layer (MAL-style): each head keeps a deep (2-layer residual MLP) or
linear memory that is trained in context by GD with momentum and weight decay on
1/2 ||M(k_t) - v_t||^2, chunk-parallel (gradients at the chunk-start state, Titans §3.2), and read
with the query. The update math lives in `nlcl.models.memory`; this file only wires projections,
gates and the output path (Titans §4.4).

Naming follows Titans: theta = inner learning rate, eta = momentum decay, alpha = forget gate
(the memory is multiplied by 1 - alpha). The writes are differentiable: the outer loss trains the
gate projections and the meta-learned initial memory through the in-context updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlcl.models.memory import GDState, MLPMemoryState, causal_depthwise_conv, chunk_step, gd_linear, mlp_memory


@dataclass
class TitansConfig:
    d_model: int = 256
    n_heads: int = 4
    head_dim: int | None = None      # default d_model // n_heads
    memory: str = "mlp"              # "mlp": M(x) = x + W1 s(W2 x); "linear": M(x) = M x
    memory_expansion: int = 2        # hidden width of the MLP memory = expansion * head_dim
    activation: str = "silu"
    chunk_size: int = 64
    conv_size: int = 4               # causal depthwise conv on q, k, v (0 or 1: none)
    momentum: bool = True            # eta gate; off: plain GD
    weight_decay: bool = True        # alpha gate; off: no forgetting
    lr_max: float = 1.0              # theta = lr_max * sigmoid(.)
    read_after_write: bool = True    # y_t = M_t(q_t) (Titans) or M_{t-1}(q_t)
    norm_eps: float = 1e-6
    compile: bool = False            # torch.compile the inputs, decay tables and chunk steps of training forwards (MLP memory)

    def __post_init__(self):
        if self.memory not in ("mlp", "linear"):
            raise ValueError(f"TitansConfig.memory must be 'mlp' or 'linear', got '{self.memory}'")
        if not isinstance(self.compile, bool):
            raise ValueError(f"model.memory.compile must be true or false, got {self.compile!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads


class Titans(nn.Module):
    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.cfg = cfg
        H, dh = cfg.n_heads, cfg.head_dim
        inner = H * dh
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.conv = None
        if cfg.conv_size > 1:  # depthwise over the q, k, v channels, left-padded so it stays causal
            self.conv = nn.Conv1d(3 * inner, 3 * inner, cfg.conv_size, groups=3 * inner,
                                  padding=cfg.conv_size - 1, bias=False)
        # one scalar per head and token for each gate: theta, then eta and alpha if enabled
        self.gate_names = ["lr"] + ["momentum"] * cfg.momentum + ["forget"] * cfg.weight_decay
        self.gates = nn.Linear(cfg.d_model, len(self.gate_names) * H)
        # meta-learned initial memory, shared by every sequence and broadcast over the batch
        if cfg.memory == "mlp":
            hidden = cfg.memory_expansion * dh
            self.w1 = nn.Parameter(torch.randn(H, dh, hidden) / math.sqrt(hidden))
            self.w2 = nn.Parameter(torch.randn(H, hidden, dh) / math.sqrt(dh))
        else:
            self.memory_init = nn.Parameter(torch.zeros(H, dh, dh))
        self.norm = nn.RMSNorm(dh, eps=cfg.norm_eps)
        self.out_gate = nn.Linear(cfg.d_model, inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)
        self._init_gates()

    @torch.no_grad()
    def _init_gates(self):
        # start with small steps, moderate momentum and slow forgetting
        start = {"lr": -2.0, "momentum": 1.0, "forget": -4.0}
        self.gates.weight.mul_(0.1)
        self.gates.bias.copy_(torch.tensor([start[n] for n in self.gate_names]).repeat_interleave(self.cfg.n_heads))

    def memory_inputs(self, x: Tensor):
        """q, k, v [B, H, T, dh] and the gates lr, momentum, retention [B, H, T] (None when off)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dh = cfg.n_heads, cfg.head_dim
        qkv = self.qkv(x)
        if self.conv is not None:
            qkv = causal_depthwise_conv(qkv, self.conv.weight)  # = self.conv(...)[..., :T], faster backward
        q, k, v = F.silu(qkv).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)   # each [B, H, T, dh]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = dict(zip(self.gate_names, self.gates(x).view(B, T, -1, H).permute(2, 0, 3, 1)))
        lr = cfg.lr_max * torch.sigmoid(gates["lr"])
        momentum = torch.sigmoid(gates["momentum"]) if cfg.momentum else None
        retention = torch.sigmoid(-gates["forget"]) if cfg.weight_decay else None   # 1 - alpha
        return q, k, v, lr, momentum, retention

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, dh = cfg.n_heads, cfg.head_dim
        # compiled (MLP memory with `compile`): the elementwise work of conv, gates and norms fuses
        inputs = chunk_step(Titans.memory_inputs, cfg.compile and cfg.memory == "mlp")
        q, k, v, lr, momentum, retention = inputs(self, x)

        # the in-context optimisation runs in float32 even under autocast: long products of decays
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = lambda t: t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()
            if cfg.memory == "mlp":
                o, _ = mlp_memory(f(q), f(k), f(v), f(lr), cfg.chunk_size, MLPMemoryState(f(self.w1), f(self.w2)),
                                  momentum=f(momentum), retention=f(retention), activation=cfg.activation,
                                  read_after_write=cfg.read_after_write, compile=cfg.compile)
            else:  # the linear memory's chunks are a few matmuls each: left eager
                o, _ = gd_linear(f(q), f(k), f(v), f(lr), cfg.chunk_size, momentum=f(momentum),
                                 retention=f(retention), initial_state=GDState(f(self.memory_init)),
                                 read_after_write=cfg.read_after_write)
        o = self.norm(o.to(x.dtype)).transpose(1, 2).reshape(B, T, H * dh)
        return self.out(o * F.silu(self.out_gate(x)))

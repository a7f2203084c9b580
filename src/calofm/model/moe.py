"""Mixture-of-Experts feed-forward grouped by absorber material.

Every material owns a group of >= 1 experts in each layer; a token is routed only among the experts
of its own material's group (top-k inside the group when it has several), plus an optional shared
expert every token goes through. Routing by material is hard (the material id selects the group),
so no token can ever reach another material's expert; the router inside a group is learned.

Groups are separate modules in an nn.ModuleList: a new material appends a group (`add_group`) and
the parameters of the existing groups are not touched, so they stay bit-identical and can be frozen.

Auxiliary losses, computed per group and averaged over tokens (groups with one expert have no router
and contribute nothing):
- Switch load balance, L = N * sum_i f_i P_i with f_i the fraction of the group's routing
  assignments that went to expert i and P_i its mean router probability (1 when balanced);
- router z-loss, mean(logsumexp(logits)^2), keeps router logits small (stable in bf16).

Decoding uses `MaterialMoE.decode` instead of `forward`: the running rows and the rows of each material
are found once (a `RoutingPlan`, rebuilt only when a shower finishes or the batch changes) instead of
by a nonzero per group, layer and step; no auxiliary loss is computed; and inside a group every expert
runs on all the group's rows, weighted by the top-k gate (zero for the experts not chosen), instead of
on the rows routed to it: with top-1 of two experts per material, twice the expert FLOPs, but no
data-dependent shapes or host syncs, the better deal at decode batch sizes (see docs/speed.md). The
sum is the same as forward's (adding an exact zero changes nothing; an unchosen expert's output must
be finite, as it is in fp32 and bf16), but matmul kernels may round a row differently depending on how
many rows they get, so the two agree to float precision, not always bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """GELU feed-forward; one expert."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@dataclass
class RoutingPlan:
    """Which rows of a decoding batch go through the MoE, and the material group of each."""

    rows: torch.Tensor | None  # (n,) the rows computed (the showers still running); None = all
    groups: list[tuple[int, torch.Tensor | None]]  # (material group, its positions among `rows`; None = all)

    @property
    def one_material(self) -> bool:
        """All rows, one group: the plan stays valid while showers finish and the batch is compacted."""
        return self.rows is None and len(self.groups) == 1


def routing_plan(material: torch.Tensor, live: torch.Tensor | None = None) -> RoutingPlan:
    """Material ids (B,) of a decoding batch and which rows still run (B,) bool, None = all -> plan.

    A batch of one material computes all its rows, finished ones included: cheaper than gathering the
    running ones, and as exact, since the CPU sgemm was seen to round a row the same way whatever the
    number of rows from 4 up (see generation.decode.COMPACT_MIN_ROWS). A mixed batch computes only the
    running rows, so that each group's experts see the same rows with or without compaction (a group's share
    of the batch can drop below 4 rows)."""
    ids = material.unique().tolist()
    if len(ids) == 1:
        return RoutingPlan(None, [(ids[0], None)])
    rows = None if live is None else live.nonzero().squeeze(1)
    mat = material if rows is None else material[rows]
    return RoutingPlan(rows, [(g, (mat == g).nonzero().squeeze(1)) for g in mat.unique().tolist()])


@dataclass
class MoEAux:
    lb: torch.Tensor  # scalar load-balance loss (token-weighted over routed groups)
    z: torch.Tensor  # scalar router z-loss
    counts: torch.Tensor  # (n_experts_total,) tokens per expert, groups in material order (detached)


class ExpertGroup(nn.Module):
    """The experts of one material, with a router when there are several."""

    def __init__(self, d: int, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.experts = nn.ModuleList([MLP(d, hidden) for _ in range(n_experts)])
        self.router = nn.Linear(d, n_experts, bias=False) if n_experts > 1 else None

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens; a subclass may change the experts, the routing stays here."""
        return self.experts[e](x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d): every expert on every row, weighted by the top-k gates (zero for the
        experts not chosen), no auxiliary losses; the same sum, in the same order, as forward."""
        if self.router is None:
            return self.expert_output(0, x)
        probs = self.router(x).float().softmax(dim=-1)  # (..., E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = top_p if self.top_k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter_(-1, top_i, gates)  # (..., E)
        y = torch.zeros_like(x)
        for e in range(len(self.experts)):
            y += (self.expert_output(e, x) * weights[..., e, None]).to(y.dtype)
        return y

    def forward(self, x: torch.Tensor):
        """x (n, d) -> y (n, d), load-balance loss, z-loss, counts (E,)."""
        if self.router is None:
            counts = torch.full((1,), x.shape[0], device=x.device, dtype=torch.long)
            return self.expert_output(0, x), None, None, counts
        n_exp = len(self.experts)
        logits = self.router(x).float()  # (n, E); routing decisions in fp32
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (n, k)
        # top-1: gate by the chosen probability (Switch), so the router gets a gradient;
        # top-k: renormalize over the chosen experts
        gates = top_p if self.top_k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(n_exp):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel():
                out = self.expert_output(e, x[rows]) * gates[rows, slot, None]
                y.index_add_(0, rows, out.to(y.dtype))
        counts = torch.bincount(top_i.flatten(), minlength=n_exp)
        f = counts.float() / top_i.numel()
        lb = n_exp * (f * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return y, lb, z, counts


class MaterialMoE(nn.Module):
    def __init__(self, d: int, hidden: int, groups: tuple[int, ...], top_k: int, shared_expert: bool):
        super().__init__()
        self.d, self.hidden, self.top_k = d, hidden, top_k
        self.groups = nn.ModuleList([ExpertGroup(d, hidden, n, min(top_k, n)) for n in groups])
        self.shared = MLP(d, hidden) if shared_expert else None

    def add_group(self, n_experts: int) -> int:
        """Append the expert group of a new material; returns its material id."""
        ref = next(self.groups[0].parameters())
        self.groups.append(ExpertGroup(self.d, self.hidden, n_experts, min(self.top_k, n_experts))
                           .to(device=ref.device, dtype=ref.dtype))
        return len(self.groups) - 1

    def forward(self, x: torch.Tensor, material: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """x (N, d) tokens, material (N,) their material ids -> (N, d)."""
        y = self.shared(x).to(x.dtype) if self.shared is not None else torch.zeros_like(x)
        zero = x.new_zeros((), dtype=torch.float32)
        lb_sum, z_sum, n_routed, counts = zero, zero, 0, []
        for g, group in enumerate(self.groups):
            rows = (material == g).nonzero().squeeze(1)
            if rows.numel() == 0:
                counts.append(torch.zeros(len(group.experts), dtype=torch.long, device=x.device))
                continue
            yg, lb, z, c = group(x[rows])
            y = y.index_add(0, rows, yg.to(y.dtype))
            counts.append(c)
            if lb is not None:
                lb_sum, z_sum, n_routed = lb_sum + lb * rows.numel(), z_sum + z * rows.numel(), n_routed + rows.numel()
        n = max(n_routed, 1)
        return y, MoEAux(lb_sum / n, z_sum / n, torch.cat(counts).detach())

    def decode(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d), routed as `plan` says (see routing_plan); rows it leaves out get 0.
        The same sums, over the same rows, as forward, except that experts see their whole group."""
        if plan.rows is not None:
            y = self.decode(x[plan.rows], RoutingPlan(None, plan.groups))
            return x.new_zeros(x.shape, dtype=y.dtype).index_copy(0, plan.rows, y)
        y = self.shared(x).to(x.dtype) if self.shared is not None else torch.zeros_like(x)
        for g, rows in plan.groups:
            if rows is None:
                y = y + self.groups[g].decode(x).to(y.dtype)
            else:
                y = y.index_add(0, rows, self.groups[g].decode(x[rows]).to(y.dtype))
        return y

"""Gradient surgery between an unlearning gradient G_u and a retaining gradient G_r.

Gradients are lists of tensors (one per trainable parameter). Everything stays on the device: no
`.item()` or Python branching on tensor values, so a training step never waits for the host.

DoCo's concept-preserving gradient (eq. 9 of the paper, λ = 1 by default):

    G = G_u                                   if G_u · G_r ≥ 0
    G = G_u − λ (G_u · G_r / ‖G_r‖²) G_r       otherwise

`scope="global"` takes the dot products over all parameters at once, as eq. 9 is written;
`scope="per_tensor"` applies the rule to each parameter tensor separately, as the authors' code does.
`projection="official"` reproduces that code's update, G_u − λ·cos(G_u, G_r)·G_r/‖G_r‖, which equals the
true projection only when ‖G_u‖ = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Grads = list[torch.Tensor]
SCOPES = ("global", "per_tensor")
PROJECTIONS = ("exact", "official")


@dataclass
class SurgeryStats:
    """Diagnostics of one surgery, as tensors (convert with `.item()` only when logging)."""

    cosine: torch.Tensor  # cos(G_u, G_r) over all parameters
    fired: torch.Tensor  # fraction of scopes (1 for global) where the gradients conflicted and were adjusted


def _dots(a: Grads, b: Grads) -> torch.Tensor:
    """Per-tensor dot products ⟨a_i, b_i⟩ as one vector (computed in float32)."""
    return torch.stack([torch.vdot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(a, b)])


def _combine(a: Grads, b: Grads, coefficients: torch.Tensor, apply: torch.Tensor) -> Grads:
    """a_i − c_i · b_i where `apply_i`, else a_i untouched (so a non-finite b_i cannot leak in)."""
    return [torch.where(m, x - c.to(x.dtype) * y, x) for x, y, c, m in zip(a, b, coefficients, apply)]


def cosine(a: Grads, b: Grads, eps: float = 1e-12) -> torch.Tensor:
    dot = _dots(a, b).sum()
    return dot / (_dots(a, a).sum().sqrt() * _dots(b, b).sum().sqrt()).clamp_min(eps)


def concept_preserving_gradient(g_u: Grads, g_r: Grads, lam: float = 1.0, scope: str = "global",
                                projection: str = "exact") -> tuple[Grads, SurgeryStats]:
    """DoCo eq. 9: remove from G_u (a fraction λ of) its component against G_r, where they conflict.

    A zero or non-finite ‖G_r‖ leaves G_u unchanged (there is no direction to protect), rather than
    dividing by zero.
    """
    if scope not in SCOPES:
        raise ValueError(f"surgery_scope {scope!r} is not one of {SCOPES}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection {projection!r} is not one of {PROJECTIONS}")
    if lam < 0:
        raise ValueError(f"surgery_lambda must be ≥ 0, got {lam}")
    uu, ur, rr = _dots(g_u, g_u), _dots(g_u, g_r), _dots(g_r, g_r)
    if scope == "global":
        uu, ur, rr = uu.sum(), ur.sum(), rr.sum()
    valid = torch.isfinite(rr) & (rr > 0)
    conflict = (ur < 0) & valid
    safe_rr = torch.where(valid, rr, torch.ones_like(rr))
    if projection == "exact":
        coefficient = lam * ur / safe_rr
    else:
        cos = ur / (uu.sqrt() * safe_rr.sqrt()).clamp_min(1e-12)
        coefficient = lam * cos / safe_rr.sqrt()
    if scope == "global":
        coefficient, conflict_per_tensor = coefficient.expand(len(g_u)), conflict.expand(len(g_u))
    else:
        conflict_per_tensor = conflict
    adjusted = _combine(g_u, g_r, coefficient, conflict_per_tensor)
    return adjusted, SurgeryStats(cosine=cosine(g_u, g_r), fired=conflict.float().mean())


def restricted_gradient(g_u: Grads, g_r: Grads, alpha: float = 1.0) -> tuple[Grads, SurgeryStats]:
    """Two-task PCGrad over flattened (global) gradients, as RGD uses: where G_u and G_r conflict, each
    is projected onto the normal plane of the other; the update is G_u' + α G_r'.

    G_u' is eq. 9 with λ = 1 and global scope; G_r' is the same rule with the roles swapped. Both are linear
    in G_u and G_r, so the update is one combination a·G_u + b·G_r, built without G_u' and G_r' as buffers of
    their own: RGD trains the whole UNet, where each such buffer is a UNet's size (3.4 GB for SD v1).
    """
    uu, ur, rr = _dots(g_u, g_u).sum(), _dots(g_u, g_r).sum(), _dots(g_r, g_r).sum()
    u_valid, r_valid = torch.isfinite(uu) & (uu > 0), torch.isfinite(rr) & (rr > 0)
    zero = torch.zeros_like(ur)
    # G_u' = G_u − c_u G_r and G_r' = G_r − c_r G_u where they conflict (c = 0 elsewhere).
    c_u = torch.where((ur < 0) & r_valid, ur / torch.where(r_valid, rr, torch.ones_like(rr)), zero)
    c_r = torch.where((ur < 0) & u_valid, ur / torch.where(u_valid, uu, torch.ones_like(uu)), zero)
    a, b = 1 - alpha * c_r, alpha - c_u
    update = [u * a.to(u.dtype) + r * b.to(r.dtype) for u, r in zip(g_u, g_r)]
    return update, SurgeryStats(cosine=cosine(g_u, g_r), fired=((ur < 0) & r_valid).float())

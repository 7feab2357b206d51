"""G_u and G_r from one forward and one backward pass, when only bias-free linear layers are trained.

Eq. 9 needs the gradients of L_u and of L_r separately. For a linear layer y = x Wᵀ the weight gradient is a
sum over batch rows, ∇_W L = Σ_b δ_bᵀ x_b with δ_b = ∂L/∂y_b, and the rows of a UNet batch never interact
(group and layer norms, attention and the timestep embedding all act per sample). So when L_u is computed on
the first rows of one batch and L_r on the others, one backward pass of L_u + L_r yields every δ_b, and
cutting the sum at the boundary gives G_u and G_r exactly. DoCo's default trainable parameters, the
cross-attention K/V projections, are such layers; on small models (the toy world, CPUs) where the cost of a
pass is mostly per-operation overhead, one pass over the joint batch is much cheaper than two over halves.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def bias_free_linears(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> list[torch.nn.Linear] | None:
    """The bias-free `nn.Linear` modules whose weights are exactly `params` (in their order), or None when the
    trainable parameters are anything else (then the gradients need separate passes)."""
    owners = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is None and f"{name}.weight" in params:
            owners[f"{name}.weight"] = module
    if set(owners) != set(params):
        return None
    return [owners[name] for name in params]


class SplitLinearGradients:
    """Records the inputs and outputs of the given linear layers during one forward pass; `gradients` then
    returns the weight gradients of a loss split at a batch row."""

    def __init__(self, modules: list[torch.nn.Linear]):
        self.modules = modules
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    @contextmanager
    def recording(self):
        """Hooks on the layers for the forward passes inside the block; each layer must run once."""
        self._inputs.clear()
        self._outputs.clear()

        def hook(index):
            def record(module, args, output):
                if index in self._outputs:
                    raise RuntimeError(f"{module} ran twice in one recorded forward pass")
                self._inputs[index], self._outputs[index] = args[0].detach(), output
            return record

        handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(self.modules)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def gradients(self, loss: torch.Tensor, split: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(∇ of the loss on rows < split, ∇ of the loss on rows ≥ split) for each layer's weight, in float32."""
        if len(self._outputs) != len(self.modules):
            raise RuntimeError(f"{len(self.modules) - len(self._outputs)} recorded layers did not run")
        outputs = [self._outputs[i] for i in range(len(self.modules))]
        deltas = torch.autograd.grad(loss, outputs)
        first, rest = [], []
        for i, delta in enumerate(deltas):
            x, delta = self._inputs[i].float(), delta.float()
            first.append(torch.einsum("n...o,n...i->oi", delta[:split], x[:split]))
            rest.append(torch.einsum("n...o,n...i->oi", delta[split:], x[split:]))
        self._inputs.clear()
        self._outputs.clear()
        return first, rest

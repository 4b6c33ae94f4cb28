"""RMSNorm that keeps no fp32 copy of its input for backward.

Gemma's RMSNorm computes in fp32 (`x.float()`), and autograd then keeps that fp32 copy of every norm input
for backward: six per Gemma 3 layer (four around the blocks, q_norm and k_norm), about 36% of all saved
activations of the 270M model under bf16 compute. This function computes exactly what the transformers
module computes, saves the input in its own dtype plus one fp32 scalar per row, and recomputes the rest in
backward. Which class to replace, and its scale convention, is family data (`ModelFamily.rms_norm`).
"""

from __future__ import annotations

import logging

import torch

from gemmatune.compat import rms_norm_eps, version_of

log = logging.getLogger("gemmatune")


class _RMSNorm(torch.autograd.Function):
    # The same operations as the transformers module, in the same order (so the same bits), written into two fp32
    # buffers instead of a fresh tensor per operation: each fresh [tokens, hidden] fp32 tensor is new memory
    # to fault in, and the norms run six times per layer, forward and backward.
    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float):
        xf = x.float()
        y = torch.mul(xf, xf)  # x.pow(2)
        rstd = y.mean(-1, keepdim=True).add_(eps).rsqrt_()
        torch.mul(xf, rstd, out=y)
        if weight is not None:
            y.mul_(weight.float() + offset)
        ctx.save_for_backward(x, rstd, weight)
        ctx.offset = offset
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        normed = x.to(torch.float32, copy=True).mul_(rstd)
        g = grad_y.to(torch.float32, copy=True)  # a copy: autograd's gradient buffer is not ours to overwrite
        grad_weight = None
        if weight is not None:
            if ctx.needs_input_grad[1]:
                grad_weight = (g * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
            g.mul_(weight.float() + ctx.offset)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)) over the last dimension
            product = g * normed
            mean = product.mean(-1, keepdim=True)
            grad_x = g.sub_(torch.mul(normed, mean, out=product)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None, None


class LeanRMSNorm(torch.nn.Module):
    """Drop-in for a transformers RMSNorm: same parameter (and state-dict name), same output."""

    def __init__(self, original: torch.nn.Module, offset: float):
        super().__init__()
        self.eps = rms_norm_eps(original)
        self.offset = offset
        self.weight = getattr(original, "weight", None)  # the same Parameter; None for scale-free norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps, self.offset)

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else "no scale"
        return f"{shape}, eps={self.eps}, offset={self.offset}"


def same_output(original: torch.nn.Module, lean: LeanRMSNorm) -> bool:
    """Whether `lean` computes what `original` computes, on inputs of ordinary size and of the size of epsilon
    (where a wrong epsilon shows). The swap relies on the library's math, which a new version may change."""
    weight = lean.weight
    if weight is not None and weight.device.type == "meta":
        return True  # nothing to compute with; a model that trains has its weights loaded
    width = weight.shape[-1] if weight is not None else 64
    device = weight.device if weight is not None else torch.device("cpu")
    dtype = weight.dtype if weight is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=generator)
    x = torch.cat([x, x * 1e-3], dim=0).to(device=device, dtype=dtype)
    with torch.no_grad():
        want, got = original(x), lean(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    return want.shape == got.shape and torch.allclose(want.float(), got.float(), rtol=tol, atol=tol * 1e-3)


def use_lean_rms_norm(model: torch.nn.Module, class_name: str | None, offset: float) -> int:
    """Replace every module of class `class_name` with LeanRMSNorm; returns how many were replaced.

    The first module is checked against its replacement first (`same_output`); if they differ (a transformers
    release changed the norm's math), every norm stays the library's own, with a warning: slower, never wrong.
    """
    if class_name is None:
        return 0
    targets = [name for name, module in model.named_modules() if type(module).__name__ == class_name]
    if targets:
        first = model.get_submodule(targets[0])
        if not same_output(first, LeanRMSNorm(first, offset)):
            log.warning("%s (transformers %s) computes differently from gemmatune's lean RMSNorm: keeping the "
                        "library's norms (more activation memory)", class_name, version_of("transformers"))
            return 0
    for name in targets:
        model.set_submodule(name, LeanRMSNorm(model.get_submodule(name), offset))
    return len(targets)

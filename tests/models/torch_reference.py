"""Shared helpers of the model tests that compare against a PyTorch reference (torch / diffusers modules)."""

import math

import numpy as np


def rel_err(a, b) -> float:
    """``max |a - b| / max |b|`` in float64 (the error measure of every reference comparison here)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomize(module, seed, std=0.3):
    """Random weights everywhere, norm weights around 1 (defaults would hide swapped tensors)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1] * math.prod(p.shape[2:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


def randomize_dit(module, seed, std=0.3):
    """Random weights everywhere but the fixed position table (the training init zeroes adaLN, which would hide errors)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_embed"):
                continue
            fan_in = p.shape[1] if p.ndim >= 2 and "embedding" not in name else 1
            p.copy_(torch.randn(p.shape, generator=g) * (std if p.ndim < 2 else 1.0 / math.sqrt(fan_in)))
    return module


def randomize_vae(m, seed):
    """Random VAE weights: norms and biases away from their (1, 0) init, kernels ~ N(0, 1/fan_in); eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:  # norms and biases: away from the (1, 0) init so errors show
                p.copy_((1.0 if name.endswith("norm1.weight") or "norm" in name and name.endswith("weight") else 0.0)
                        + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
    return m.eval()

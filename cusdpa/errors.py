"""The errors cusdpa raises for bad arguments.

PyTorch raises RuntimeError for a bad tensor argument (wrong dtype, shape or device), so code written
against ``torch.nn.functional.scaled_dot_product_attention`` catches RuntimeError; Python code expects
ValueError for a bad value and TypeError for a wrong type. Each error here is both, so either kind of
caller catches it, with the same message.
"""
from __future__ import annotations


class ArgumentError(ValueError, RuntimeError):
    """An argument has a value cusdpa cannot take (shape, device, range)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument has a type or dtype cusdpa cannot take."""

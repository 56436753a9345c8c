"""Running one provider on one problem: cusdpa's public API on NumPy/CuPy arrays under
``cusdpa.sdpa_kernel``, or ``torch.nn.functional.scaled_dot_product_attention`` on torch tensors under
``torch.nn.attention.sdpa_kernel``. Both sides get the same values (on a GPU, the same memory).

Each run is used inside its ``context()``: ``chosen`` names the cusdpa backend that runs, or raises
``NotAvailable`` with the reason (cusdpa's from ``cusdpa.explain``; torch decides when called, so its
``forward`` and ``backward`` raise it, with the warnings and error of its dispatcher); ``forward`` and
``backward`` call once and return the function to time with what it computed.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

from .config import SIMULATOR_KNOBS, Provider
from .device import Inputs, Point


class NotAvailable(Exception):
    """The provider has no kernel for this problem; the message says why."""


class CusdpaRun:
    def __init__(self, provider: Provider, inputs: Inputs, point: Point):
        from cusdpa.dispatch import Backend

        self.backend = None if provider.backend is None else Backend[provider.backend]
        self.q, self.k, self.v, self.dout = inputs.arrays
        self.causal = point.causal

    @contextlib.contextmanager
    def context(self):
        """Only this backend enabled (EFFICIENT takes NumPy arrays only while MATH is disabled); on Numba's
        CUDA simulator, EFFICIENT with SIMULATOR_KNOBS."""
        from cusdpa import Backend, environment, sdpa_kernel

        with contextlib.ExitStack() as stack:
            if self.backend is not None:
                stack.enter_context(sdpa_kernel([self.backend]))
            if self.backend is Backend.EFFICIENT and environment.simulator_enabled():
                import kernels_numba

                stack.enter_context(kernels_numba.configured(kernels_numba.KernelConfig(**SIMULATOR_KNOBS)))
            yield

    def chosen(self, need_grad: bool) -> str:
        """The backend that runs (the one dispatch picks for the default provider); NotAvailable if none."""
        from cusdpa import explain

        ex = explain(self.q, self.k, self.v, is_causal=self.causal, need_grad=need_grad)
        if self.backend is None:
            if ex.chosen is None:
                raise NotAvailable(str(ex))
            return ex.chosen.name
        if ex.reasons[self.backend]:
            raise NotAvailable("; ".join(ex.reasons[self.backend]))
        return self.backend.name

    def forward(self):
        """(timed function, its output)."""
        from cusdpa import scaled_dot_product_attention

        fn = lambda: scaled_dot_product_attention(self.q, self.k, self.v, is_causal=self.causal)  # noqa: E731
        return fn, fn()

    def backward(self):
        """(timed function, grad_to_none, gradients): the backward alone, after one forward."""
        from cusdpa import attention_vjp

        _, vjp = attention_vjp(self.q, self.k, self.v, is_causal=self.causal)
        fn = lambda: vjp(self.dout)  # noqa: E731
        return fn, None, fn()


# torch's SDPA on nested (jagged) tensors logs, at WARNING on this logger, why each kernel refuses the batch
# ("... not used because:" and the reason) before it raises "No viable backend"
NESTED_SDPA_LOGGER = "torch.nested._internal.sdpa"


class _Collect(logging.Filter):
    """Keeps a logger's messages (for the n/a reason) instead of letting them reach stderr."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def filter(self, record) -> bool:
        self.messages.append(record.getMessage())
        return False


def _torch_reason(error: Exception, caught, logged) -> str:
    lines = [str(w.message).split("(Triggered internally")[0].strip() for w in caught]
    lines += [m.strip() for m in logged if not m.rstrip().endswith("not used because:")]
    return "; ".join([line for line in dict.fromkeys(lines) if line] + [str(error).splitlines()[0]])


@contextlib.contextmanager
def torch_dispatch_errors():
    """Turn torch's 'no kernel for these inputs' into NotAvailable, with the reasons it warned or logged
    about (the nested-tensor SDPA logs them, which would otherwise spill onto stderr)."""
    logger, logged = logging.getLogger(NESTED_SDPA_LOGGER), _Collect()
    logger.addFilter(logged)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            except RuntimeError as e:
                text = str(e)
                if "No available kernel" in text or "No viable backend" in text:
                    raise NotAvailable(_torch_reason(e, caught, logged.messages)) from e
                raise
    finally:
        logger.removeFilter(logged)


class TorchRun:
    def __init__(self, provider: Provider, inputs: Inputs, point: Point):
        import torch

        self.torch = torch
        self.backend = provider.backend
        self.q, self.k, self.v, self.dout = inputs.tensors
        self.causal = point.causal

    def context(self):
        if self.backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, self.backend))

    def chosen(self, need_grad: bool) -> None:
        return None  # torch's dispatcher decides inside the call

    def _sdpa(self, q, k, v):
        return self.torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)

    def forward(self):
        fn = lambda: self._sdpa(self.q, self.k, self.v)  # noqa: E731
        with torch_dispatch_errors():
            return fn, fn()

    def backward(self):
        leaves = [x.detach().requires_grad_() for x in (self.q, self.k, self.v)]
        with torch_dispatch_errors():
            out = self._sdpa(*leaves)
            fn = lambda: out.backward(self.dout, retain_graph=True)  # noqa: E731
            fn()
        return fn, leaves, tuple(x.grad for x in leaves)


def make_run(provider: Provider, inputs: Inputs, point: Point):
    return (CusdpaRun if provider.library == "cusdpa" else TorchRun)(provider, inputs, point)

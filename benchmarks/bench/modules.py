"""Parts b and c: the tutorial's CausalSelfAttention module (interop.CausalSelfAttention) with cusdpa
and with PyTorch's SDPA, same weights, in inference: a dense batch and a nested batch of variable
lengths (about 50% padding), then a dense batch under torch.compile.

The reference is the same module in float64 attending through cusdpa's MATH backend (the reference),
run sequence by sequence for the nested batch; the yardstick is the torch module in the input dtype.
"""
from __future__ import annotations

import contextlib
import logging
import time

import numpy as np

from cusdpa.verify import judge
from .config import Options
from .device import Device
from .providers import NotAvailable, torch_dispatch_errors

DTYPE = "float16"

# interop's nested path builds its output with torch.nested.nested_tensor_from_jagged, whose check for
# fx.symbolic_trace logs (once a process, torch 2.13) a notice about torch's own is_fx_tracing API: not
# about this batch or the bench, so kept off the screen while the modules run
FX_NOTICE_LOGGER, FX_NOTICE = "torch.fx._symbolic_trace", "is_fx_tracing will return true"


class _DropFxNotice(logging.Filter):
    def filter(self, record) -> bool:
        return not record.getMessage().startswith(FX_NOTICE)


@contextlib.contextmanager
def _quiet():
    """The modules' calls without the is_fx_tracing notice (every other log record still shows)."""
    logger, notice = logging.getLogger(FX_NOTICE_LOGGER), _DropFxNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class Models:
    """The cusdpa and torch modules with one set of weights, and the float64 reference."""

    def __init__(self, torch, opts: Options, device: str):
        import interop
        from cusdpa.dispatch import Backend

        s = opts.sizes
        torch.manual_seed(opts.seed)
        args = dict(num_heads=s.module_heads, embed_dimension=s.module_heads * s.module_head_dim, bias=False,
                    is_causal=True, dropout=0.1)
        self.by_library = {lib: interop.CausalSelfAttention(**args, attention=lib).to(device, getattr(torch, DTYPE))
                           for lib in ("cusdpa", "torch")}
        self.reference = interop.CausalSelfAttention(**args, backend=Backend.MATH).to(device, torch.float64)
        for model in (self.by_library["torch"], self.reference):
            model.load_state_dict(self.by_library["cusdpa"].state_dict())
        for model in (*self.by_library.values(), self.reference):
            model.eval()
        self.torch = torch

    def truth(self, sequences):
        """float64 outputs of the tokens of each (L_i, D) sequence, concatenated along the tokens."""
        with self.torch.no_grad():
            return self.torch.cat([self.reference(x[None].double())[0] for x in sequences])


def _tokens(y):
    """(tokens, D) of a dense (B, L, D) or nested (B, j, D) output."""
    return y.values() if y.is_nested else y.reshape(-1, y.shape[-1])


def _batches(torch, opts: Options, device: str, part: str) -> dict:
    """name -> (model input, its sequences): the tutorial's batches of part b, or part c's dense one."""
    s = opts.sizes
    D = s.module_heads * s.module_head_dim
    gen = torch.Generator(device=device).manual_seed(opts.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=getattr(torch, DTYPE))

    if part == "c":
        x = randn(s.module_batch, s.compile_len, D)
        return {"dense": (x, list(x))}
    dense = randn(s.module_batch, s.module_len, D)
    # The tutorial's ragged batch: lengths of about half the maximum, one sequence at the maximum.
    rng = np.random.default_rng(opts.seed)
    lengths = [max(1, int(s.module_len * (1 - rng.normal(0.5, 0.01)))) for _ in range(s.module_batch)]
    lengths[int(rng.integers(s.module_batch))] = s.module_len
    sequences = [randn(n, D) for n in lengths]
    nested = torch.nested.nested_tensor(sequences, layout=torch.jagged)
    return {"dense": (dense, list(dense)), "nested": (nested, sequences)}


def measure(part: str, opts: Options, dev: Device, results, progress) -> None:
    """Part b (dense and nested batches) or part c (eager and torch.compile), cusdpa and torch."""
    torch = dev.torch
    device = "cuda" if dev.gpu else "cpu"
    models = Models(torch, opts, device)
    modes = ("eager", "compiled") if part == "c" else ("eager",)
    checked = []
    for batch, (x, sequences) in _batches(torch, opts, device, part).items():
        outputs, rows = {}, []
        for library, model in models.by_library.items():
            for mode in modes:
                record = dict(part=part, batch=batch, provider=library, mode=mode, dtype=DTYPE,
                              sequences=len(sequences), tokens=int(sum(len(s) for s in sequences)),
                              max_len=int(max(len(s) for s in sequences)))
                try:
                    fn = _compiled(torch, model, x, opts, record) if mode == "compiled" else \
                        (lambda m=model, x=x: m(x))
                    with torch.no_grad(), torch_dispatch_errors(), _quiet():
                        outputs[library, mode] = _tokens(fn())
                except NotAvailable as e:
                    results.add(dict(record, status="n/a", reason=str(e)))
                    progress()
                    continue
                except Exception as e:
                    results.add(dict(record, status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0]))
                    progress()
                    continue
                rows.append((record, fn))
        _judge(dev, [r for r, _ in rows], outputs, models.truth(sequences))
        checked += rows
    dev.free()
    for record, fn in checked:
        if "status" not in record:  # passed its check
            try:
                with torch.no_grad(), _quiet():
                    t = dev.timer(fn)
                record.update(status="ok", ms=t.ms, runs=t.runs, timer=t.method)
            except Exception as e:
                record.update(status="error", reason=f"timing: {type(e).__name__}: {e}".splitlines()[0])
        results.add(record)
        progress()


def _compiled(torch, model, x, opts: Options, record: dict):
    """torch.compile(model), compiled by one call here; record['compile_s'] is that call's wall time."""
    compiled = torch.compile(model, backend=opts.compile_backend)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    record["compile_s"] = time.perf_counter() - start
    return lambda: compiled(x)


def _judge(dev: Device, records, outputs: dict, truth) -> None:
    """Max error of each output; one beyond 2x the torch eager module's error (the yardstick) fails."""
    truth = dev.wide(truth)
    base = outputs.get(("torch", "eager"))
    bound = None if base is None else judge.bound("out", truth, dev.wide(base), DTYPE)
    for record in records:
        got = dev.wide(outputs[record["provider"], record["mode"]])
        record["error"] = {"out": judge.max_error(got, truth)}
        if bound is None:
            record["note"] = "not judged: the torch module, the yardstick, did not run"
            continue
        verdict = bound.verdict(record["error"]["out"])
        if verdict:
            record.update(status="failed", reason=verdict)

"""cusdpa in PyTorch's flash-attention slot: unchanged code that runs PyTorch's FLASH_ATTENTION backend
(``F.scaled_dot_product_attention`` under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` or chosen by PyTorch,
eager or compiled, nested jagged tensors, ``torch.nn.attention.varlen``) runs cusdpa's kernels instead.

    import interop.flash_slot
    interop.flash_slot.register()                                    # once; names the slot "cusdpa"
    torch.nn.attention.activate_flash_attention_impl("cusdpa")       # PyTorch's flash ops now run cusdpa
    with torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # eager, torch.compile, backward alike
    torch.nn.attention.restore_flash_attention_impl()                # PyTorch's own FlashAttention-2 again

Activation registers Python kernels for the CUDA dispatch key of the aten ops behind PyTorch's flash
backend, as PyTorch's own FA3/FA4 providers do (torch/nn/attention/_fa4.py); restoring removes them:

- ``_scaled_dot_product_flash_attention`` (+ ``_backward``): what SDPA's FLASH backend calls, eager and in
  compiled graphs (AOTAutograd decomposes SDPA into it). Layout (B, H, L, E).
- ``_flash_attention_forward`` / ``_flash_attention_backward``: dense (B, L, H, E), or packed (tokens, H, E)
  with int32 ``cum_seq_q``/``cum_seq_k`` (nested jagged tensors' flash path, ``torch.nn.attention.varlen``),
  with ``window_size_left``/``window_size_right``; and ``_flash_attention_forward_no_dropout_inplace`` where
  this torch has it (2.13: ``varlen_attn_out``).

What the slot carries is only what PyTorch's flash backend selects: no attn_mask, fp16/bf16, head dims up
to 256 (padded to multiples of 8 by PyTorch). Masks, cusdpa's windows on dense calls and every other dtype
go through ``interop.sdpa_override`` or ``interop.scaled_dot_product_attention``.

Mapping (the contract of PyTorch's flash ops, read from its FlashAttention-2 kernels and meta functions):

- Causal alignment: these ops align ``is_causal`` and the window to the bottom-right diagonal when
  L != S (FlashAttention's causal; PyTorch's own ``causal_lower_right`` bias calls the dense op with
  ``is_causal=True`` for exactly that), so the slot passes ``causal_variant="lower_right"``. SDPA itself
  only sends ``is_causal`` with L == S, where both alignments agree. Windows keep keys from ``left``
  before to ``right`` after that diagonal, -1 (or None) unbounded; causal clips ``right`` to 0.
- Grouped-query attention: fewer key/value heads than query heads is GQA (``enable_gqa``), as in
  PyTorch's flash kernels.
- Layouts: the dense op's (B, H, L, E) tensors are passed as they are; (B, L, H, E) ones as transposed
  views; packed ones to cusdpa's variable-length ops. Outputs and gradients are laid out as
  ``torch.empty_like`` of the matching input, which the ops' meta functions promise (and a compiled
  graph asserts): cusdpa's own layouts are used where they agree (the output of token-major inputs, the
  common ``x.view(B, L, H, E).transpose(1, 2)``), a copy made where they do not (gradients of token-major
  inputs, the output of (B, H, L, E)-contiguous ones). logsumexp is float32 (B, H, L), packed (H, tokens).
- Dropout: the keep-mask is cusdpa's (Philox4x32-10 keyed by a seed drawn from torch's CPU generator, as
  everywhere in interop; ``torch.manual_seed`` reproduces it), not PyTorch's. The forward returns that
  seed as ``rng_state`` = (seed, 0), a uint64 CPU tensor (PyTorch's own is (seed, offset) on the GPU), so
  the backward regenerates the same mask without waiting on the GPU. A backward given a GPU rng_state (a
  forward run by PyTorch's kernel before activation) refuses dropout: it cannot replay that mask. Dropout
  while a CUDA graph is captured is refused (a host-drawn seed would be frozen into the graph); without
  dropout ``rng_state`` is an empty tensor on the inputs' device, as PyTorch's is.
- Not taken (NotImplementedError naming the argument): ``return_debug_mask``, ``alibi_slopes`` (PyTorch's
  flash backward gets no slopes, so its gradients could not include them), ``seqused_k``, ``block_table``
  (paged KV). ``num_splits`` (a split-KV scheduling hint) is ignored.
  Whatever cusdpa itself cannot run raises cusdpa's error, naming the value and the fix.

Packed calls read ``cum_seq_q``/``cum_seq_k`` back to the host (cusdpa checks them), so they synchronise
with the GPU once per call, unlike PyTorch's kernel.
"""
from __future__ import annotations

import torch

from cusdpa import dispatch

from . import arguments, ops

NAME = "cusdpa"
MIN_TORCH = "2.11"  # the first release with register_, activate_ and restore_flash_attention_impl together

_state = {"backend": dispatch.DEFAULT_PRIORITY}  # the cusdpa backends the slot tries, in priority order


def register(backend=None) -> None:
    """Register cusdpa as PyTorch flash-attention implementation ``"cusdpa"`` (idempotent; activation stays the
    user's choice, as torch.nn.attention asks of providers):

        import interop.flash_slot
        interop.flash_slot.register()
        torch.nn.attention.activate_flash_attention_impl("cusdpa")
        ...                                           # PyTorch's FLASH_ATTENTION backend runs cusdpa
        torch.nn.attention.restore_flash_attention_impl()

    ``backend`` (a cusdpa.Backend or a sequence of them) restricts the cusdpa backends the slot tries, as in
    ``interop.scaled_dot_product_attention``; by default FLASH, then EFFICIENT, then MATH. It is fixed here,
    not read per call, so that a backward on autograd's thread dispatches as its forward did.
    """
    attention = torch.nn.attention
    missing = [name for name in ("register_flash_attention_impl", "restore_flash_attention_impl")
               if not hasattr(attention, name)]
    if missing:
        raise RuntimeError(f"interop.flash_slot needs torch >= {MIN_TORCH}: this torch {torch.__version__} has no "
                           f"torch.nn.attention.{' or .'.join(missing)}; route F.scaled_dot_product_attention to "
                           "cusdpa with interop.sdpa_override() instead")
    chosen = dispatch.DEFAULT_PRIORITY if backend is None else backend
    arguments.backend_names(chosen)  # reject a bad backend now rather than at the first call
    _state["backend"] = chosen
    attention.register_flash_attention_impl(NAME, register_fn=_activate)


class _Handle:
    """What ``restore_flash_attention_impl`` calls ``remove`` on: drops the kernels, so PyTorch's own
    (registered before them for the same key) run again."""

    def __init__(self, library: torch.library.Library):
        self.library = library

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _activate() -> _Handle:
    library = torch.library.Library("aten", "IMPL", "CUDA")
    for name, kernel in KERNELS.items():
        if hasattr(torch.ops.aten, name):  # the op set differs between torch releases
            library.impl(name, kernel, "CUDA")
    return _Handle(library)


# ---- argument mapping ---------------------------------------------------------------------------------

def _not_taken(**given) -> None:
    for name, value in given.items():
        if value is not None and value is not False:
            shown = "a tensor" if isinstance(value, torch.Tensor) else repr(value)
            raise NotImplementedError(
                f"cusdpa in PyTorch's flash-attention slot does not take {name}={shown}; restore PyTorch's kernel "
                "with torch.nn.attention.restore_flash_attention_impl() for such calls")


def _resolve(dropout_p, is_causal, scale, enable_gqa, window_left=None, window_right=None) -> tuple[tuple, str]:
    """(option values, backends) for cusdpa's ops: bottom-right alignment, FlashAttention's window."""
    left = -1 if window_left is None or window_left < 0 else int(window_left)
    right = -1 if window_right is None or window_right < 0 else int(window_right)
    window = None if (left, right) == (-1, -1) else (left, right)
    return arguments.resolve(dropout_p, is_causal, scale, enable_gqa, "lower_right", window, 0.0, _state["backend"])


def _draw_rng(query: torch.Tensor, dropout_p: float) -> tuple:
    """(seed for cusdpa's ops, rng_state, unused) of a forward call."""
    unused = query.new_empty((), dtype=torch.uint64)
    if dropout_p <= 0:
        return None, query.new_empty((2,), dtype=torch.uint64), unused
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        raise NotImplementedError(
            "cusdpa in PyTorch's flash-attention slot cannot capture dropout in a CUDA graph: its seed is drawn on "
            "the host and would be frozen into the graph; use dropout_p=0 there, or PyTorch's kernel")
    seed = arguments.draw_seed(dropout_p)
    return seed, torch.cat((seed, seed.new_zeros(1))).view(torch.uint64), unused


def _replay_seed(rng_state: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """The seed a forward of the slot returned in ``rng_state``, as cusdpa's ops take it."""
    if dropout_p <= 0:
        return None
    if rng_state.device.type != "cpu":
        raise NotImplementedError(
            "this backward's forward ran PyTorch's flash kernel (its rng_state is on the GPU), whose dropout mask "
            "cusdpa cannot regenerate; activate the cusdpa slot before the forward, or restore PyTorch's kernel "
            "until the backward is done")
    return rng_state.reshape(-1)[:1].view(torch.int64)


def _debug_mask(query: torch.Tensor) -> torch.Tensor:
    return query.new_empty(0)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    # strides of size-1 dims are free (compiled graphs' size/stride assertions skip them too)
    return all(n <= 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


def _laid_out_like(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``result`` in the layout of ``torch.empty_like(like)``, the layout the op's meta function gives (and a
    compiled graph asserts): ``result`` itself where it already has it, else a copy."""
    if result.shape != like.shape or _same_layout(result, like):
        return result
    want = torch.empty_like(like)
    return result if _same_layout(result, want) else want.copy_(result)


def _bhsd(*tensors: torch.Tensor) -> tuple:
    """(B, L, H, E) tensors as the (B, H, L, E) views cusdpa's dense ops take."""
    return tuple(t.transpose(1, 2) for t in tensors)


# ---- the kernels ----------------------------------------------------------------------------------------

def sdpa_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """``aten::_scaled_dot_product_flash_attention``: (B, H, L, E) inputs -> (out, logsumexp, cum_seq_q,
    cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)."""
    _not_taken(return_debug_mask=return_debug_mask)
    seed, rng_state, unused = _draw_rng(query, dropout_p)
    options, backends = _resolve(dropout_p, is_causal, scale, query.size(1) != key.size(1))
    out, lse = ops.call(ops.sdpa_fwd, *arguments.unit_strides(query, key, value), None, None, *options, seed, backends)
    return (_laid_out_like(out, query), lse, None, None, query.size(2), key.size(2), rng_state, unused,
            _debug_mask(query))


def sdpa_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, philox_seed, philox_offset, *, scale=None):
    """``aten::_scaled_dot_product_flash_attention_backward``: (grad_query, grad_key, grad_value)."""
    seed = _replay_seed(philox_seed, dropout_p)
    options, backends = _resolve(dropout_p, is_causal, scale, query.size(1) != key.size(1))
    dq, dk, dv, _ = ops.call(ops.sdpa_bwd, grad_out, *arguments.unit_strides(query, key, value), None, None, out,
                             logsumexp, *options, seed, backends, torch.are_deterministic_algorithms_enabled(), False)
    return _laid_out_like(dq, query), _laid_out_like(dk, key), _laid_out_like(dv, value)


def flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
                  scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                  block_table=None, num_splits=None):
    """``aten::_flash_attention_forward``: dense (B, L, H, E) or packed (tokens, H, E) inputs -> (out,
    logsumexp, rng_state, unused, debug_attn_mask). ``num_splits`` is a scheduling hint, ignored."""
    # alibi_slopes: PyTorch's flash backward takes no slopes, so its gradients could not include them
    _not_taken(return_debug_mask=return_debug_mask, seqused_k=seqused_k, alibi_slopes=alibi_slopes,
               block_table=block_table)
    if (cum_seq_q is None) != (cum_seq_k is None):
        raise ValueError("cum_seq_q and cum_seq_k must both be given (packed inputs) or both be None (dense)")
    seed, rng_state, unused = _draw_rng(query, dropout_p)
    heads = 1 if cum_seq_q is not None else 2
    options, backends = _resolve(dropout_p, is_causal, scale, query.size(heads) != key.size(heads), window_size_left,
                                 window_size_right)
    q, k, v = arguments.unit_strides(query, key, value)
    if cum_seq_q is None:
        out, lse = ops.call(ops.sdpa_fwd, *_bhsd(q, k, v), None, None, *options, seed, backends)
        out = out.transpose(1, 2)
    else:
        out, lse = ops.call(ops.varlen_fwd, q, k, v, cum_seq_q, cum_seq_k, None, max_q, max_k, *options, seed,
                            backends)
    return _laid_out_like(out, query), lse, rng_state, unused, _debug_mask(query)


def flash_forward_no_dropout_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                     return_debug_mask, **options):
    """``aten::_flash_attention_forward_no_dropout_inplace``: writes the output into ``out``, returns logsumexp."""
    if dropout_p != 0:
        raise ValueError(f"dropout_p={dropout_p}: this op takes no dropout")
    result, lse, *_ = flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, 0.0, is_causal,
                                    return_debug_mask, **options)
    out.copy_(result)
    return lse


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
    """``aten::_flash_attention_backward``: (grad_query, grad_key, grad_value) in the inputs' layout."""
    seed = _replay_seed(rng_state, dropout_p)
    heads = 1 if cum_seq_q is not None else 2
    options, backends = _resolve(dropout_p, is_causal, scale, query.size(heads) != key.size(heads), window_size_left,
                                 window_size_right)
    q, k, v = arguments.unit_strides(query, key, value)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if cum_seq_q is None:
        grads = ops.call(ops.sdpa_bwd, *_bhsd(grad_out, q, k, v), None, None, out.transpose(1, 2), logsumexp,
                         *options, seed, backends, deterministic, False)[:3]
        grads = _bhsd(*grads)
    else:
        grads = ops.call(ops.varlen_bwd, grad_out, q, k, v, cum_seq_q, cum_seq_k, None, out, logsumexp, max_q, max_k,
                         *options, seed, backends, deterministic)
    return tuple(_laid_out_like(g, x) for g, x in zip(grads, (query, key, value)))


KERNELS = {
    "_scaled_dot_product_flash_attention": sdpa_flash_forward,
    "_scaled_dot_product_flash_attention_backward": sdpa_flash_backward,
    "_flash_attention_forward": flash_forward,
    "_flash_attention_forward_no_dropout_inplace": flash_forward_no_dropout_inplace,
    "_flash_attention_backward": flash_backward,
}

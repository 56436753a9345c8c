"""Hugging Face transformers: ``attn_implementation="cusdpa"`` through transformers' ``AttentionInterface``.

    import interop.hf                      # registers "cusdpa" with transformers (idempotent)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="cusdpa")
    model = AutoModel.from_pretrained(name, attn_implementation="cusdpa")
    model.set_attn_implementation("cusdpa")  # switch a loaded model (transformers >= 4.56)

**Registration on import.** Importing this module registers ``attention_forward`` under "cusdpa" in
transformers' ``AttentionInterface`` and, where transformers has one (``AttentionMaskInterface``,
transformers >= 4.53), registers "cusdpa" to build its masks with the "sdpa" mask builder. Registering
only adds the name "cusdpa"; no existing implementation changes, so the side effect is harmless and the
user-facing flow is one import. ``register(name)`` does the same under another name (or again, after
something replaced the entry); it is idempotent.

**What a call does** (``attention_forward``, the contract of transformers' ``sdpa_attention_forward``:
query (B, Hq, L, D), key/value (B, Hkv, S, D), returns (output (B, L, Hq, D), None)):

- *Grouped-query attention* runs natively (``enable_gqa``) whenever ``Hq != Hkv``: key and value are
  never repeated (transformers' sdpa copies them with ``repeat_kv`` whenever a mask is present outside
  one-token decoding, and in every call before transformers 4.56).
- *Causal*: the same rule as transformers' sdpa. ``is_causal`` comes from the argument, else
  ``module.is_causal`` (default True), and is used only when ``L > 1`` and no mask arrived, i.e. when
  transformers' mask builder found the mask purely causal and skipped it; then cusdpa applies causality
  itself (``is_causal=True``, upper-left, the FLASH backend's fast path) instead of reading a dense mask.
  Keys past ``L`` (a prefill into an empty static cache) are sliced off (a view), as sdpa does.
- *Masks* arrive as transformers' sdpa builds them: 4-D (B, 1, L, S) bool (True = attend; transformers
  >= 4.53 with the mask interface registered) or float additive (older versions, which build an eager
  mask for any implementation they do not know), sliced to S keys. cusdpa reads both through their
  broadcast strides without expanding them. With a bool mask, a query row that sees no key (left padding)
  gives 0; with a float mask such a row averages the values, as in PyTorch.
- *Sliding windows* are in the mask (transformers materialises it whenever the window can bite, for
  sdpa as for cusdpa); the ``sliding_window`` keyword is ignored, as sdpa ignores it: when no mask
  arrived the window cannot cut anything.
- *Position bias* (``position_bias``, T5-style models) is folded into a float mask as sdpa does; cusdpa
  gives the float mask its gradient.
- *Dropout*: ``dropout`` is used as given; the models already pass 0 unless ``module.training``.
  cusdpa draws its seed from torch's CPU generator (``torch.manual_seed`` reproduces it).

- *Logit soft-capping* (``softcap``, Gemma-2-style models) is passed on: cusdpa computes it (where sdpa
  raises), on its MATH backend until the kernels take it.

**What it does not take.** Arguments that change the numbers and that cusdpa cannot compute raise
``ValueError`` naming the alternative: ``head_mask`` and ``s_aux`` (attention sinks). ``output_attentions=True`` warns once and returns no weights, exactly as
sdpa does. Inputs cusdpa cannot take (another device type such as MPS or XPU, another dtype, an integer
mask, a non-positive scale) and, in eager mode, inputs no enabled cusdpa backend runs go to
transformers' own "sdpa" function, with a warning once per reason.

torch.compile traces ``attention_forward`` and cusdpa's ops without graph breaks. Backends:
``cusdpa.sdpa_kernel([...])`` around a forward restricts them, as for any cusdpa call (under torch.compile,
those enabled when the graph was traced).
"""
from __future__ import annotations

import warnings

import torch

try:
    import transformers
    from transformers import AttentionInterface
except ImportError as e:  # no transformers, or one older than 4.51 (no AttentionInterface)
    raise ImportError("interop.hf needs transformers >= 4.51 (with AttentionInterface); install the extra: "
                      f"pip install 'cusdpa[hf]' ({e})") from e

from . import functional, override

NAME = "cusdpa"

# Keyword arguments that change the result and that neither cusdpa nor PyTorch's SDPA computes.
_UNSUPPORTED = {
    "head_mask": "a head mask (head_mask)",
    "s_aux": "attention sinks (s_aux)",
}
_warned: set[str] = set()


@torch.compiler.assume_constant_result
def _warn_once(message: str) -> bool:
    # Evaluated for real while torch.compile traces (warnings.warn would break the graph); a constant after.
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"cusdpa attention (transformers): {message}", stacklevel=3)
    return True


def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    # Looked up per call: whatever transformers registers as "sdpa" (a fresh interface reads the global mapping).
    sdpa = AttentionInterface()["sdpa"]
    return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                **kwargs)


def _position_bias_mask(position_bias, attention_mask, is_causal, q_length, kv_length):
    """transformers' sdpa rule: the bias where a key is visible, the dtype's minimum elsewhere (a float mask)."""
    if attention_mask is None:
        if not is_causal:
            return position_bias
        device = position_bias.device
        causal = torch.arange(q_length, device=device)[:, None] >= torch.arange(kv_length, device=device)[None, :]
        return torch.where(causal, position_bias, torch.finfo(position_bias.dtype).min)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, torch.finfo(position_bias.dtype).min)
    return position_bias + attention_mask


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, computed by ``interop.scaled_dot_product_attention``.

    query (B, Hq, L, D), key and value (B, Hkv, S, D[v]); ``attention_mask`` None or 4-D (B, 1, L, S[+]) bool
    (True = attend) or float (added). Returns (output (B, L, Hq, Dv), None). The module docstring says
    how causality, grouped-query attention, masks, windows and unsupported arguments are handled.
    """
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='cusdpa' does not support {what}; load the model with "
                             "attn_implementation='eager' (or 'flex_attention') for it")
    if kwargs.get("output_attentions", False):
        _warn_once("output_attentions=True is not supported (as with 'sdpa'); the attention weights are None. "
                   "Use attn_implementation='eager' to get them")
    # The arguments as received, for transformers' sdpa if cusdpa cannot run them.
    received = (module, query, key, value, attention_mask, dropout, scaling, is_causal)
    reason = override.unsupported_reason(query, key, value, attention_mask, scaling)
    if reason is not None:
        _warn_once(f"{reason}; falling back to transformers' 'sdpa' attention")
        return _sdpa_fallback(*received, **kwargs)

    position_bias = kwargs.get("position_bias")
    q_length, kv_length = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, :kv_length]  # a longer mask: transformers < 4.53's sdpa slices too
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # transformers' sdpa rule: causal only when no mask arrived (the mask builder found it purely causal) and
    # not while decoding one token. The shape is tested first so that torch.compile sees a bool, not a SymBool.
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if torch.jit.is_tracing() and isinstance(is_causal, torch.Tensor):
        is_causal = bool(is_causal.item())
    if is_causal and kv_length > q_length:
        # Prefill into an empty static cache: upper-left causal never reaches keys past L; drop them (a view).
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, q_length, key.shape[2])
        is_causal = False

    try:
        out = functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                      is_causal=is_causal, scale=scaling,
                                                      enable_gqa=query.shape[1] != key.shape[1],
                                                      softcap=kwargs.get("softcap") or 0.0)
    except NotImplementedError as e:  # no enabled cusdpa backend runs these inputs; the message says why
        _warn_once(f"{e}; falling back to transformers' 'sdpa' attention")
        return _sdpa_fallback(*received, **kwargs)
    # cusdpa lays its output out as (B, L, Hq, Dv) in memory: the transpose is a view, contiguous() copies nothing.
    return out.transpose(1, 2).contiguous(), None


def _mask_interface():
    """transformers' ``AttentionMaskInterface`` (>= 4.53), or None where masks are built inside each model."""
    found = getattr(transformers, "AttentionMaskInterface", None)
    if found is None:
        try:
            from transformers.masking_utils import AttentionMaskInterface as found
        except ImportError:
            return None
    return found


def register(name: str = NAME) -> None:
    """Register ``attention_forward`` under ``name`` in transformers' ``AttentionInterface`` and, where
    transformers has an ``AttentionMaskInterface``, have ``name`` build its masks as "sdpa" does (4-D bool,
    or None when causal or full attention need no mask). Idempotent; ``import interop.hf`` calls it."""
    AttentionInterface.register(name, attention_forward)
    masks = _mask_interface()
    if masks is not None:
        # Without an entry, transformers >= 4.53 would build no mask at all for ``name`` (padding ignored).
        masks.register(name, masks()["sdpa"])


register()

"""SDPA with grouped-query attention under a mask, for the slot-scoring passes on CPU.

Transformers' ``sdpa`` attention lets SDPA share the key/value heads among the query heads
(``enable_gqa``) only without a mask; with one (the trie's 4D mask, a prefill over a cache) it
first copies every key and value head ``groups`` times (``repeat_kv``), the whole cache in every
layer of every pass. On CPU, SDPA takes the mask and the shared heads together, with the same
result. ``gqa_sdpa(model)`` switches a model to that attention for a ``with`` block through
Transformers' own registry (``AttentionInterface``, ``AttentionMaskInterface``: the same masks
as ``sdpa``) and back after; any other model (not ``sdpa``, no shared heads, not on CPU, where
SDPA's fast kernels do not take both) is left as it is.
"""

from __future__ import annotations

from contextlib import contextmanager

NAME = "sdpa_gqa_masked"


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``sdpa_attention_forward``, but a mask does not make the key/value heads be repeated."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or key.shape[1] == query.shape[1] or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionMaskInterface._global_mapping:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def gqa_sdpa(model):
    cfg = model.config
    was = cfg._attn_implementation
    heads, kv = getattr(cfg, "num_attention_heads", 0), getattr(cfg, "num_key_value_heads", None)
    if was != "sdpa" or not kv or kv == heads or model.device.type != "cpu" \
            or not hasattr(model, "set_attn_implementation"):
        yield
        return
    _register()
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(was)

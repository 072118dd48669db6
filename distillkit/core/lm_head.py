"""The logits-free path of `DistillationTrainer`: whether a Hugging Face causal LM can feed
`fused_linear_distill_loss` (a final hidden state and a plain linear LM head), running it to that
hidden state, its logit transform (scale, soft cap), and checking once that head(hidden) reproduces the
model's own logits.

All three take the unwrapped model (no DDP / PEFT wrapper); `forward_hidden` runs the wrapped one,
so that data-parallel gradient hooks fire.
"""

from __future__ import annotations

import inspect
import sys
from typing import Optional

import torch
from torch import nn

from .logit_transform import transform_logits

# Config attributes through which a model transforms head(hidden) before returning its logits.
# Logit transforms of the configs that the logits-free path applies (logit_transform), and those it cannot.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
UNSUPPORTED_TRANSFORMS = ("output_multiplier_scale",)
# head(hidden) vs the model's logits, relative in norm: absorbs bf16 / autocast rounding; a wrong hidden
# state (e.g. before the final norm) or a transformed head is off by O(1).
HEAD_CHECK_TOLERANCE = 5e-2


def _is_plain_linear(head) -> bool:
    """nn.Linear itself, or the class FSDP2's fully_shard swaps in for a head sharded as its own unit
    (FSDPLinear(FSDPModule, nn.Linear): the same forward; its DTensor weight is gathered by the op)."""
    if type(head) is nn.Linear:
        return True
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    return fsdp_module is not None and isinstance(head, fsdp_module) and type(head).__bases__ == (fsdp_module,
                                                                                                  nn.Linear)


def head_problem(model: nn.Module) -> Optional[str]:
    """Why `model` cannot feed the logits-free op (None if it can)."""
    if not hasattr(model, "get_output_embeddings") or not hasattr(model, "get_decoder"):
        return f"{type(model).__name__} has no get_output_embeddings()/get_decoder()"
    head = model.get_output_embeddings()
    if not _is_plain_linear(head):
        return f"{type(model).__name__}'s output embedding is {type(head).__name__}, not a plain nn.Linear"
    if head.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the logits-free op takes fp32/bf16/fp16 LM heads, not {head.weight.dtype}"
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError) as exc:
        return f"{type(model).__name__}.get_decoder() failed ({exc})"
    if decoder is None or decoder is model:
        return f"{type(model).__name__} exposes no separate decoder"
    config = getattr(model, "config", None)
    for attr in UNSUPPORTED_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 0, 1, 1.0, False):
            return f"{type(model).__name__} transforms its logits ({attr}={value})"
    return None


def logit_transform(model: nn.Module) -> tuple[float, Optional[float]]:
    """(scale, softcap) of the model's logits over its head output z: softcap * tanh(scale * z / softcap), or
    scale * z (the keywords of fused_linear_distill_loss). Read from the config: Gemma 2/3's
    final_logit_softcapping, Cohere's logit_scale (multiplies), Granite's logits_scaling (divides)."""
    config = getattr(model, "config", None)

    def value(attr):
        v = getattr(config, attr, None)
        return None if v in (None, 0, False) else float(v)
    scale = (value("logit_scale") or 1.0) / (value("logits_scaling") or 1.0)
    return scale, value("final_logit_softcapping")


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def forward_hidden(model: nn.Module, unwrapped: nn.Module, kwargs: dict):
    """Run `model` (wrapped or not; `unwrapped` is the bare model), capturing its decoder's final hidden
    state; the LM head computes the logits of the last position only (logits_to_keep=1) where the model
    supports it. Returns (hidden in the head's dtype, head, the model's outputs)."""
    decoder, head = unwrapped.get_decoder(), unwrapped.get_output_embeddings()
    captured = {}

    def hook(_module, _args, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(hook)
    try:
        extra = {"logits_to_keep": 1} if _accepts(unwrapped.forward, "logits_to_keep") else {}
        outputs = model(**kwargs, **extra)
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"{type(unwrapped).__name__}'s decoder did not run in its forward")
    hidden = captured["hidden"]
    if hidden.dtype != head.weight.dtype:
        hidden = hidden.to(head.weight.dtype)
    return hidden, head, outputs


def head_reproduces_logits(hidden: torch.Tensor, head: nn.Linear, outputs,
                           transform: tuple[float, Optional[float]] = (1.0, None)) -> bool:
    """Whether the captured hidden state through the head (and the model's logit transform) gives the model's
    own logits (last position)."""
    logits = getattr(outputs, "logits", None)
    if logits is None:
        return False
    with torch.no_grad():
        bias = head.bias.float() if head.bias is not None else None
        scale, softcap = transform
        mine = transform_logits(nn.functional.linear(hidden[:, -1:].float(), head.weight.float(), bias), scale,
                                softcap or 0.0)
        theirs = logits[:, -1:].float()
        if mine.shape != theirs.shape:
            return False
        error = torch.linalg.vector_norm(mine - theirs) / torch.linalg.vector_norm(theirs).clamp_min(1e-6)
        return bool(error <= HEAD_CHECK_TOLERANCE)


__all__ = ["head_problem", "logit_transform", "forward_hidden", "head_reproduces_logits"]

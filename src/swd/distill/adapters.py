"""The LoRA adapters on the one shared transformer: which one a forward runs with, and folded
weights for forwards in which an adapter does not train.

The student, the critic and the teacher are one transformer: the teacher is the base with
adapters off, the student and the critic are the base with their own adapter. Switching goes
through peft's per-layer API, as diffusers' ``set_adapter`` / ``disable_adapters`` do.

Folding: per adapted Linear, peft's LoRA path runs the base product plus ``x A`` and ``(x A) B``
with their own kernels (and the same again in the backward). ``W + s B A`` is the same map in one
product. It always pays when the adapter is frozen (the student making the critic's samples; the
critic and the MMD features in the generator update) and pays in training when the rank is high
for the layer widths (:func:`folding_pays_in_training`). peft's ``merge_adapter`` folds in place
and unfolds by subtraction, which does not give ``W`` back bitwise and would let the frozen
teacher drift over thousands of switches; peft has no out-of-place merge, so the folded weights
are made here with peft's own ``get_delta_weight`` and passed to the forward with
``torch.func.functional_call``, leaving the module's weights untouched.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

AdapterState = tuple[bool, tuple[str, ...]]  # (adapters disabled, active adapter names)

_LAYERS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, ...], list[tuple[str, BaseTunerLayer]]]]" = weakref.WeakKeyDictionary()
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, tuple[str, tuple[int, ...], dict[str, torch.Tensor]]]" = weakref.WeakKeyDictionary()


def lora_layers(module: nn.Module) -> list[BaseTunerLayer]:
    """The peft tuner layers inside ``module`` (searched each call: for one block)."""
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def named_lora_layers(transformer: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    """The transformer's tuner layers with their module paths, found once per set of adapters."""
    names = tuple(getattr(transformer, "peft_config", {}))
    cached = _LAYERS.get(transformer)
    if cached is None or cached[0] != names:
        cached = (names, [(n, m) for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)])
        _LAYERS[transformer] = cached
    return cached[1]


def adapter_state(layers: list[BaseTunerLayer]) -> AdapterState | None:
    """What these adapter layers run with now (None: there are none). Adapters are switched on
    every layer together, so the first layer tells (diffusers' ``active_adapters`` reads it so)."""
    if not layers:
        return None
    return bool(layers[0].disable_adapters), tuple(layers[0].active_adapters)


def set_adapter_state(layers: list[BaseTunerLayer], state: AdapterState) -> None:
    """Switch these layers. peft's ``set_adapter`` / ``enable_adapters`` also flip
    ``requires_grad``; which parameters train is the trainer's decision, so every flag is put back."""
    disabled, names = state
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(not disabled)
        if names:
            layer.set_adapter(list(names))
    for p, flag in flags:
        p.requires_grad_(flag)


@contextlib.contextmanager
def adapter_state_as(layers: list[BaseTunerLayer], state: AdapterState | None) -> Iterator[None]:
    current = adapter_state(layers)
    if state is None or state == current:
        yield
        return
    set_adapter_state(layers, state)
    try:
        yield
    finally:
        set_adapter_state(layers, current)


def _active(layers: list[BaseTunerLayer]) -> str | None:
    state = adapter_state(layers)
    if state is None or state[0]:
        return None
    return ",".join(state[1])


def active_adapter(transformer: nn.Module) -> str | None:
    """The adapter the transformer's forward uses now (None: adapters off, i.e. the teacher)."""
    return _active([m for _, m in named_lora_layers(transformer)])


def use_adapter(transformer: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter (None: adapters off, i.e. the teacher); a no-op when it is
    already active (consecutive forwards of one view). ``requires_grad`` flags are kept."""
    if not getattr(transformer, "_hf_peft_config_loaded", False):
        if name is not None:
            raise ValueError(f"adapter {name!r} requested but the model has no adapters")
        return
    if name is not None and name not in transformer.peft_config:
        raise ValueError(f"adapter {name!r} not found; the model has {sorted(transformer.peft_config)}")
    layers = [m for _, m in named_lora_layers(transformer)]
    if _active(layers) == name:
        return
    set_adapter_state(layers, (name is None, () if name is None else (name,)))


def adapter_parameters(module: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n and f".{name}." in n]


def _foldable(layer: BaseTunerLayer, name: str) -> bool:
    """A plain LoRA Linear on an fp32 base: folding it is exact up to float rounding. (Folded into
    bf16 / fp16 base weights, small updates would be rounded away; DoRA and dropout are not a
    single product.)"""
    if name not in getattr(layer, "lora_A", {}):
        return True  # not adapted by this adapter: nothing to fold
    return (isinstance(layer, LoraLinear) and layer.base_layer.weight.dtype == torch.float32
            and not layer.use_dora.get(name, False) and isinstance(layer.lora_dropout[name], nn.Identity))


def _adapted(transformer: nn.Module, name: str) -> list[tuple[str, BaseTunerLayer]] | None:
    """The layers ``name`` adapts, or None when one of them cannot be folded (see :func:`_foldable`)."""
    layers = [(n, m) for n, m in named_lora_layers(transformer) if name in getattr(m, "lora_A", {})]
    if not layers or not all(_foldable(m, name) for _, m in layers):
        return None
    return layers


def _fold(layers: list[tuple[str, BaseTunerLayer]], name: str) -> dict[str, torch.Tensor]:
    return {f"{n}.base_layer.weight": m.base_layer.weight + m.get_delta_weight(name) for n, m in layers}


def folded_weights(transformer: nn.Module, name: str) -> dict[str, torch.Tensor] | None:
    """``{"<path>.base_layer.weight": W + s B A}`` for every layer adapted by ``name`` (paths relative
    to ``transformer``), made without gradients, or None when a layer cannot be folded.

    One set is kept per transformer and remade when any of the adapter's weights changed (an
    optimizer step or a checkpoint load updates them in place, which bumps their version counters).
    """
    layers = _adapted(transformer, name)
    if layers is None:
        return None
    versions = tuple(p._version for _, m in layers for p in (m.lora_A[name].weight, m.lora_B[name].weight))
    cached = _FOLDED.get(transformer)
    if cached is not None and cached[0] == name and cached[1] == versions:
        return cached[2]
    _FOLDED.pop(transformer, None)  # one set at a time: free the old one before making the new
    with torch.no_grad():
        weights = _fold(layers, name)
    _FOLDED[transformer] = (name, versions, weights)
    return weights


def folding_pays_in_training(layers: list[tuple[str, BaseTunerLayer]], name: str) -> bool:
    """Whether folding is also the cheaper way to TRAIN the adapter. Per token, LoRA adds the
    products ``x A``, ``(x A) B`` and three more in the backward, ``3 r (d_in + d_out)`` multiply-adds
    per layer; folded, the backward needs the weight gradient ``d_in d_out`` instead (then cheap,
    token-free products for A and B). High ranks on narrow layers (the built-in model) fold;
    SD3.5 / FLUX widths at rank 64 do not."""
    lora = sum(3 * m.r[name] * (m.in_features + m.out_features) for _, m in layers)
    folded = sum(m.in_features * m.out_features for _, m in layers)
    return folded <= lora


FOLD_AUTO_SHARE = 0.1  # "auto" folds when LoRA adds at least this share of the base products


def lora_product_share(layers: list[tuple[str, BaseTunerLayer]], name: str) -> float:
    """LoRA's extra multiply-adds per token in a forward (``x A`` and ``(x A) B``: ``r (d_in + d_out)``
    per layer) over the base products of the layers it adapts (``d_in d_out``)."""
    lora = sum(m.r[name] * (m.in_features + m.out_features) for _, m in layers)
    base = sum(m.in_features * m.out_features for _, m in layers)
    return lora / base


def check_fold_setting(setting: bool | str) -> None:
    if not (isinstance(setting, bool) or setting == "auto"):
        raise ValueError(f"distill.fold_adapters={setting!r}: use true, false or auto")


def resolve_fold(setting: bool | str, transformer: nn.Module, name: str) -> bool:
    """Whether adapter ``name``'s views fold (``distill.fold_adapters``: true, false or "auto").

    Folding holds one copy of the adapted weights, a second backbone in memory for what it saves:
    LoRA's extra products and kernels. "auto" folds where those are a sizeable share of the work,
    :data:`FOLD_AUTO_SHARE` of the base products or more: narrow layers at a high rank, such as the
    built-in models (rank 32 on 128 wide layers: 0.31; measured 1.2x faster at batch 64). Wide layers
    do not fold (a 512-wide model at rank 16: 0.05, measured 5% faster folded for a whole second copy
    of its weights; SD3.5 / FLUX at rank 64: 0.06), nor does anything on a bf16 / fp16 base.
    """
    check_fold_setting(setting)
    if isinstance(setting, bool):
        return setting
    layers = _adapted(transformer, name)
    return layers is not None and lora_product_share(layers, name) >= FOLD_AUTO_SHARE


def weights_for_forward(transformer: nn.Module, name: str, params: list[nn.Parameter]) -> dict[str, torch.Tensor] | None:
    """Folded weights to run this forward of adapter ``name`` with, or None for peft's LoRA path.

    - adapter frozen (no gradient reaches ``params``): the kept folded set, always;
    - adapter training: weights folded inside the autograd graph (gradients reach A and B through
      them), when :func:`folding_pays_in_training`;
    - never under per-block gradient checkpointing with gradients on: a checkpointed block is
      recomputed during backward, outside the folded call.
    """
    if not torch.is_grad_enabled():
        return folded_weights(transformer, name)
    if getattr(transformer, "gradient_checkpointing", False):
        return None
    if not any(p.requires_grad for p in params):
        return folded_weights(transformer, name)
    layers = _adapted(transformer, name)
    if layers is None or not folding_pays_in_training(layers, name):
        return None
    return _fold(layers, name)

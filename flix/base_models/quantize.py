"""The frozen base in 4 or 8 bits (`model.quantize=nf4|int8`): its nn.Linear layers
replaced by bitsandbytes layers, as transformers' load_in_4bit / load_in_8bit and peft's
QLoRA do. FLix banks stay float32 over them (`flix.layer`); the base's own dequantizing
matmul computes W0 x, untouched.

- nf4: `bnb.nn.Linear4bit`, NF4 in blocks of 64 with double-quantized block scales
  (QLoRA's storage), computing in the model's dtype.
- int8: `bnb.nn.Linear8bitLt`, LLM.int8() row-wise int8 weights with the outlier
  threshold 6.0 (transformers' default); it casts its inputs to float16, and the
  warning bitsandbytes logs about that on every call is filtered out.

Kept in float: the output projection (`lm_head`, or whatever get_output_embeddings
returns, often tied to the input embeddings), any module named like an embedding, the
modules the model asks to keep in float32 (`_keep_in_fp32_modules`, e.g. T5's `wo`)
and everything that is not an nn.Linear (embeddings, norms, transformers' Conv1D: a
GPT-2 base has nothing to quantize and is refused).

The model is loaded in float first and converted here, so loading peaks at the float
model's size; afterwards the float weights are freed. bitsandbytes is imported only
when a quantized base is asked for (extra "quant": `pip install -e ".[quant]"`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

QUANTIZE = ("none", "nf4", "int8")
INSTALL_HINT = 'pip install -e ".[quant]"'
_FLAG = {"nf4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}  # what peft reads to pick its bnb LoRA layers


def backend(method: str):
    """bitsandbytes for nf4 and int8 (checked to run here), None for none; an unknown
    value or an unusable bitsandbytes is refused before any model loads."""
    if method not in QUANTIZE:
        raise ValueError(f"model.quantize={method!r} is not known: use one of {', '.join(QUANTIZE)} (none keeps the base in model.dtype)")
    return None if method == "none" else bitsandbytes(method)


def quantize(model: nn.Module, method: str, compute_dtype: torch.dtype, bnb=None) -> nn.Module:
    """Replace the model's nn.Linear layers (but those kept in float) in place; returns it."""
    bnb = bnb or backend(method)
    if method == "none":
        return model
    keep = kept_in_float(model)
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear and name not in keep]
    if not names:
        raise ValueError(
            f"model.quantize={method} found no nn.Linear layer to quantize in {type(model).__name__} "
            "(only nn.Linear is converted, not transformers' Conv1D as in GPT-2): use model.quantize=none"
        )
    with torch.random.fork_rng(devices=[]):  # layer constructors initialise weights: keep the caller's RNG stream
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, _convert(bnb, getattr(owner, child), method, compute_dtype))
    setattr(model, _FLAG[method], True)
    return model


def kept_in_float(model: nn.Module) -> set[str]:
    """Names of the nn.Linear modules that stay in float (see the module docstring)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if module is output or leaf == "lm_head" or "embed" in name.lower() or leaf in fp32:
            keep.add(name)
    return keep


def _convert(bnb, linear: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module:
    weight, device = linear.weight.data, linear.weight.device
    has_bias = linear.bias is not None
    if method == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        # On AVX512-BF16 CPUs bitsandbytes repacks the weight in place at the first eval-mode,
        # no-grad forward (a validation pass) and from then on multiplies through a kernel with
        # no autograd, training included: the gradients after validation come out wrong (76%
        # off on tiny, tests/test_quantized.py). One kernel for training and evaluation.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device).requires_grad_(False)  # moving the weight to a device quantizes it


def bitsandbytes(method: str):
    """bitsandbytes, checked to quantize and run one small layer here, or an error that
    says what to do."""
    try:
        import bitsandbytes as bnb
    except Exception as err:  # missing, or its native library fails to load
        raise RuntimeError(
            f"model.quantize={method} needs bitsandbytes, which cannot be imported ({err}): {INSTALL_HINT}, or use model.quantize=none"
        ) from err
    try:
        probe = nn.Linear(64, 64, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            probe.weight.copy_(torch.linspace(-1, 1, 64 * 64).view(64, 64)), probe.bias.zero_()
        _convert(bnb, probe, method, torch.float32)(torch.ones(1, 64))
    except Exception as err:  # e.g. no backend for this device in this bitsandbytes build
        raise RuntimeError(
            f"model.quantize={method}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {method} layers here ({type(err).__name__}: {err}); "
            f"install a build with a backend for this machine ({INSTALL_HINT} pins one with a CPU backend) or use model.quantize=none"
        ) from err
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_quiet_int8_cast)
    return bnb


def _quiet_int8_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def storage_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold, with bitsandbytes' quantization
    state (4-bit block scales, int8 row scales); each storage counted once."""
    seen: dict[tuple, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[(t.device, t.data_ptr())] = max(seen.get((t.device, t.data_ptr()), 0), t.numel() * t.element_size())

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)  # Params4bit
        while state is not None:
            add(state.absmax), add(state.code)
            state = getattr(state, "state2", None)
        add(getattr(t, "SCB", None))  # Int8Params, before the first forward moves it to the layer's state
    for module in model.modules():
        state = getattr(module, "state", None)  # Linear8bitLt after its first forward
        add(getattr(state, "SCB", None))
    return sum(seen.values())

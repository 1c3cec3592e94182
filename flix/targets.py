"""Which modules of a base model FLix adapts: names given as suffixes or a regex, or by
default the model family's attention and MLP projections. A quantized base's
bitsandbytes Linear4bit / Linear8bitLt layers are nn.Linear subclasses and count alike.
"""

from __future__ import annotations

import re

from torch import nn

from flix.layer import is_adaptable

# Projection names per family; default_target_modules keeps those the model has.
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_T5_STYLE = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
_GPT2_STYLE = ("c_attn", "c_proj", "c_fc")
_FAMILIES = {
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"), _LLAMA_STYLE),
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5_STYLE),
    "gpt2": _GPT2_STYLE,
}
# Fallback scan: a projection counts when some enclosing module's name has one of these.
_BLOCK_HINTS = ("attn", "attention", "mlp", "ffn", "feed_forward", "densereludense")


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model: nn.Module, target_modules: list[str] | str | None) -> list[str]:
    """Full names of the Linear/Conv1D modules (4/8-bit ones included) to adapt."""
    if target_modules is None:
        target_modules = default_target_modules(model)
    names = [name for name, module in model.named_modules() if name and _matches(name, target_modules) and is_adaptable(module)]
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear/Conv1D in {type(model).__name__}; "
            "pass module-name suffixes such as ['q_proj', 'v_proj'] or a regex"
        )
    return names


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of the attention and MLP projections, the modules adapters wrap."""
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if is_adaptable(module)}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _FAMILIES.get(model_type)
    found = [name for name in family if name in leaves] if family else _scan_blocks(model)
    if not found:
        raise ValueError(
            f"no attention/MLP projections found in {type(model).__name__} (model_type={model_type!r}); name the target modules explicitly"
        )
    return found


def _scan_blocks(model: nn.Module) -> list[str]:
    """Unknown families: every Linear/Conv1D inside an attention or MLP block."""
    found: list[str] = []
    for name, module in model.named_modules():
        *parents, leaf = name.split(".")
        inside_block = any(hint in part.lower() for part in parents for hint in _BLOCK_HINTS)
        excluded = leaf == "lm_head" or "embed" in name.lower()
        if is_adaptable(module) and inside_block and not excluded and leaf not in found:
            found.append(leaf)
    return found

"""FLix: Featurized Low-Rank Mixtures.

Every dataset feature (task, language, ...) owns a low-rank adapter; each example
uses the sum of its active features' adapters.
"""

__version__ = "0.1.0"
__all__ = ["FLixConfig", "FLixDataCollator", "FLixModel", "get_flix_model", "lm_loss"]


def __getattr__(name):
    # Lazy, so `flix score` and `flix data` start without importing torch.
    if name == "FLixDataCollator":
        from flix.collator import FLixDataCollator

        return FLixDataCollator
    if name == "FLixConfig":
        from flix.config import FLixConfig

        return FLixConfig
    if name == "lm_loss":
        from flix.loss import lm_loss

        return lm_loss
    if name in __all__:
        from flix import model

        return getattr(model, name)
    raise AttributeError(f"module 'flix' has no attribute {name!r}")

"""FLix: Featurized Low-Rank Mixtures.

Every dataset feature (task, language, ...) owns a low-rank adapter; each example
uses the sum of its active features' adapters.
"""
from flix.adapters import FLixConfig, FLixModel, get_flix_model

__all__ = ["FLixConfig", "FLixModel", "get_flix_model"]
__version__ = "0.1.0"

"""graphprune: structured pruning for ONNX models.

    import graphprune
    pruned, report = graphprune.prune("model.onnx", ratio=0.5)
"""
from .api import analyze_model, prune, save  # noqa: F401
from .options import OptionError, PruneOptions  # noqa: F401
from .report import PruneReport  # noqa: F401
from .errors import GraphpruneError, ModelLoadError, PassError, PlanError, VerificationError  # noqa: F401
from .plan import RewritePlan  # noqa: F401

__version__ = "0.1.0"

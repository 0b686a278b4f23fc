"""Exceptions graphprune raises. Expected limitations are diagnostics, not exceptions."""


class GraphpruneError(Exception):
    """Base class: every error the CLI turns into one clear line."""


class ModelLoadError(GraphpruneError):
    """The input is missing, not ONNX, truncated, or points at unsafe external data."""


class PassError(GraphpruneError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class VerificationError(GraphpruneError):
    """The pruned model disagrees with the masked original."""

    def __init__(self, message, output=None, max_diff=None):
        super().__init__(message)
        self.output = output
        self.max_diff = max_diff


class PlanError(GraphpruneError):
    """A plan does not fit the model it is applied to."""


class RuleError(GraphpruneError):
    """A rule was registered twice or declared something inconsistent."""


class UnsupportedModelError(GraphpruneError):
    """A valid model of a kind graphprune does not prune (classical ONNX-ML), said at once and why."""

"""The papers' diagnostics: gradient norm by layer, activation growth with depth, angular
distance, layer drop, norm input/output curves, BHyT's statistic check, stability maps."""

from normlab.diagnostics.diagnose import diagnose

__all__ = ["diagnose"]

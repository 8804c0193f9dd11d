"""Interpretability of the federated model: permutation importance, SHAP, coefficients and
calibration, computed at each site on its own rows and added at the server (issue 19)."""

from consortium.interpret.calibration import calibration_summary, site_calibration_counts
from consortium.interpret.coefficients import linear_coefficients
from consortium.interpret.importance import (
    SiteImportance,
    aggregate_importance,
    feature_groups,
    site_differences,
    site_permutation_importance,
)
from consortium.interpret.shap_summary import SiteShap, aggregate_shap, site_shap
from consortium.interpret.summary import enabled, interpret_model

__all__ = [
    "SiteImportance",
    "SiteShap",
    "aggregate_importance",
    "aggregate_shap",
    "calibration_summary",
    "enabled",
    "feature_groups",
    "interpret_model",
    "linear_coefficients",
    "site_calibration_counts",
    "site_differences",
    "site_permutation_importance",
    "site_shap",
]

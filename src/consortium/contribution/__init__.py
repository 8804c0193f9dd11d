"""Contribution scores: who brought what to the federation (Shapley values over coalition models).

See :mod:`consortium.contribution.shapley` (the estimators) and
:mod:`consortium.contribution.recording` (what the server keeps, and the coalition models).
"""

from consortium.contribution.recording import (
    METHODS,
    ContributionRecorder,
    ModelUtility,
    RecordingAggregator,
    RoundUpdates,
    Settings,
    benefit,
    combine_rounds,
    load_rounds,
    score_round,
    validation_data,
)
from consortium.contribution.shapley import (
    MAX_EXACT_PLAYERS,
    CountingGame,
    Estimate,
    exact_shapley,
    gtg_shapley,
    leave_one_out,
    tmc_shapley,
)

__all__ = [
    "MAX_EXACT_PLAYERS", "METHODS", "ContributionRecorder", "CountingGame", "Estimate",
    "ModelUtility", "RecordingAggregator", "RoundUpdates", "Settings", "benefit",
    "combine_rounds", "exact_shapley", "gtg_shapley", "leave_one_out", "load_rounds",
    "score_round", "tmc_shapley", "validation_data",
]

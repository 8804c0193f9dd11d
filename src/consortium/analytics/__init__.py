"""Federated analytics: statistics, Table 1, harmonisation checks and the bias report, computed
from per-site aggregates, never from pooled rows (issue 15)."""

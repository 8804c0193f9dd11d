"""Federated analytics: statistics, Table 1, harmonisation checks and the bias report, computed
from per-site aggregates, never from pooled rows (issue 15).

The public API: :func:`analyze` (an experiment's ``[analysis]`` over its ``[data]`` sites, as
``consortium analyze`` runs it), :func:`run_query` with :class:`Query` and a site call
(:func:`in_process`, :func:`on_ray`; ``consortium server --analyze`` for deployed sites), and
:func:`write` for the files. Submodules: ``query`` (the two-phase protocol), ``site``
(disclosure control at each site), ``server`` (combining sums), ``secure`` (SecAgg+), ``dp``
(differential privacy), ``expr`` (the filter language), ``survival``, ``bias``, ``report``.
"""

from consortium.analytics.analysis import Analysis, analyze, in_process, on_ray, run_query, write
from consortium.analytics.query import Query

__all__ = ["Analysis", "Query", "analyze", "in_process", "on_ray", "run_query", "write"]

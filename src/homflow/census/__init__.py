"""Censuses of many gradient flows from small random initialisations: escape times and the escape-time law, the
certified NCF KKT point each flow aligns with, the first saddle and the sparsity kept, where each flow ends
(docs/math.md sections 3-4; arXiv 2403.08121, 2502.15952), integrated as refilled batches of the stiff-aware engine."""

from ._census import Census, CensusOptions, census, random_directions
from ._cluster import Canonicaliser, CertifiedPoints, certify_and_match, cluster_directions
from ._driver import DriverOptions, DriverResult, default_batch_size, precompile, run_members
from ._law import CensusLaw, fit_escape_law, within_slope
from ._shard import census_shard, run_members_sharded
from ._table import CensusTable, read_table

__all__ = [
    "census",
    "Census",
    "CensusOptions",
    "random_directions",
    "Canonicaliser",
    "CertifiedPoints",
    "certify_and_match",
    "cluster_directions",
    "DriverOptions",
    "DriverResult",
    "default_batch_size",
    "run_members",
    "precompile",
    "CensusLaw",
    "fit_escape_law",
    "within_slope",
    "run_members_sharded",
    "census_shard",
    "CensusTable",
    "read_table",
]

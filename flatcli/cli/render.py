"""The terminal tables, now in :mod:`flatcli.tables` (kept for imports of this name)."""

from ..tables import (  # noqa: F401
    audit_tables,
    bound_table,
    correlations,
    finetune_tables,
    inspect_table,
    measures_table,
    name_column,
    robustness_table,
)

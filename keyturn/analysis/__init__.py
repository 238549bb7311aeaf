"""SQL analysis for the Keyturn gateway: classify each statement a client sends.

This package only re-exports the public API; the PostgreSQL classifier lives in
``postgres.py`` and its curated data in ``catalogue.py``.  It must not grow logic of its own.
"""

from __future__ import annotations

from keyturn.analysis.postgres import (
    Analysis,
    Analyzer,
    PreparedStatements,
    Statement,
    StatementClass,
)

__all__ = ["Analysis", "Analyzer", "PreparedStatements", "Statement", "StatementClass"]

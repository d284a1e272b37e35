"""The MLflow tags that mark a search's runs: the search writes them, the export reads them to find trials."""

from __future__ import annotations

TRIAL_TAG = "ptune_search.trial_id"
ROLE_TAG = "ptune_search.role"  # "search", "trial" or "baseline"
BEST_TAG = "ptune_search.best"  # "true" on the trial the search chose

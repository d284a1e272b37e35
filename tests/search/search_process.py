"""A search driver run as a user would; it lives in benchmarks/search_harness, which the chaos benchmark shares."""

from benchmarks.search_harness.search_process import (
    REPO,
    TINY_CONFIG,
    SearchProcess,
    assert_no_survivors,
    wait_for,
)

__all__ = ["REPO", "TINY_CONFIG", "SearchProcess", "assert_no_survivors", "wait_for"]

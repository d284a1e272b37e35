"""What a test does when the machine lacks something it needs: a developer's machine skips it, CI fails.

CI (``CI`` set, as CI services do) is where every test must run, so a missing tool or privilege there is an
error to fix in ``.ci/install``, never a test that silently did not run.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run this test (see .ci/install)", pytrace=False)
    pytest.skip(reason)

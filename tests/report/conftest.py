import os

import pytest

from report_helpers import find_chromium


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium (Debian's `chromium`, installed by scripts/setup.sh when run as root).
    Skipped where there is none, except in CI (env CI set), where its absence is a failure: the
    report must be proven to load in a real browser there."""
    path = find_chromium()
    if path is None:
        msg = "no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path

"""pytest plugin of gpu-check: tests not started by the deadline (epoch seconds in GPU_CHECK_TEST_DEADLINE) are
skipped, so pytest ends inside its budget and still writes its JUnit XML."""

import os
import time

import pytest

ENV = "GPU_CHECK_TEST_DEADLINE"


def pytest_runtest_setup(item):
    deadline = float(os.environ.get(ENV, "inf"))
    if time.time() > deadline:
        pytest.skip("gpu-check: the tests' time budget is spent")

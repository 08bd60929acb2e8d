import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name, so each test gets its own fresh data."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.name)) % (2**32)
    return np.random.default_rng(seed)

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MeterdProcess  # noqa: E402

from meterd import Meterd  # noqa: E402


@pytest.fixture(scope="module")
def server():
    s = MeterdProcess()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    c = Meterd(server.url, server.api_key)
    yield c
    c.close()

import os
import sys

import pytest

import switchyard


def pytest_sessionstart(session):
    # The tests must exercise the installed wheel, never the source tree.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert not os.path.abspath(switchyard.__file__).startswith(here + os.sep), (
        f"switchyard was imported from the source tree ({switchyard.__file__}); install the wheel"
    )


@pytest.fixture
def store(tmp_path):
    return f"sqlite:{tmp_path / 'switchyard.db'}"


@pytest.fixture
def client(store):
    return switchyard.Client(store)


@pytest.fixture
def make_worker(store):
    started = []

    def make(**kw):
        kw.setdefault("shutdown_grace", 2.0)
        w = switchyard.Worker(store, **kw)
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()

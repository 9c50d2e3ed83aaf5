import pytest

from sdsengine.eval import tasks


@pytest.fixture
def hub(monkeypatch):
    """In place of the hub (no network in tests): serves the rows set in `hub.rows` to every task and
    records what each load asked for in `hub.calls`. No data directory is set."""
    class FakeHub:
        def __init__(self):
            self.rows, self.calls = [], []

        def __call__(self, *args, **kwargs):
            self.calls.append((args, kwargs))
            return list(self.rows)
    fake = FakeHub()
    monkeypatch.setattr(tasks, "hub_dataset", fake)
    monkeypatch.delenv("SDSENGINE_DATA_DIR", raising=False)
    return fake

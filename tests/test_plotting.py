"""The matplotlib helper: headless when installed, None when not."""

from __future__ import annotations

import builtins

from e1min.plotting import pyplot


def test_pyplot_is_headless_or_none(monkeypatch):
    plt = pyplot()
    if plt is not None:
        import matplotlib

        assert matplotlib.get_backend().lower() == "agg"
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert pyplot() is None

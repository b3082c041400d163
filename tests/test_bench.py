"""The benches say what they lack before they run anything."""

from __future__ import annotations

import sys

import pytest

from bench import peers

pytestmark = pytest.mark.unit


def test_peers_asks_for_matplotlib_before_it_runs_anything(monkeypatch, tmp_path, capsys):
    """Issue 19: `python -m bench.peers --plot peers.png` ran every server for ten minutes, then ended in
    `ModuleNotFoundError: matplotlib`."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed: import fails
    with pytest.raises(SystemExit) as stopped:
        peers.main(["--plot", str(tmp_path / "peers.png")])
    assert stopped.value.code == 2
    assert "--plot needs matplotlib: pip install -e '.[bench]'" in capsys.readouterr().err

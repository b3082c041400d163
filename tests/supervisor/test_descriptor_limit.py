"""The open-files check at start-up counts every connection a worker may hold, DoT and DoH included."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

# In a child: the limit lowered here could not be raised again in the test process.
_CHECK = """
import logging, resource, sys
from resolver.supervisor.process import raise_descriptor_limit
from tests.certificates import NAME
from tests.conftest import make_config
logging.basicConfig(stream=sys.stdout, format="%(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (16384, 16384))
tls = {"max_connections": int(sys.argv[1])}
if sys.argv[2] == "listening":
    tls |= {"dot_listen": ["127.0.0.1:0"], "certificate": "c.pem", "key": "k.pem", "name": NAME}
raise_descriptor_limit(make_config(["127.0.0.1:9"], server={"tcp_max_connections": 1000}, tls=tls))
"""


def warned(max_connections: int, listening: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", _CHECK, str(max_connections), listening], capture_output=True, text=True, check=True
    ).stdout


def test_tls_connections_count_against_the_open_files_a_worker_may_need():
    assert "tls.max_connections" in warned(20_000, "listening")
    assert warned(2_000, "listening") == ""
    assert warned(20_000, "not listening") == ""  # no listener: its cap holds nothing

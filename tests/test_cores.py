"""Workers of one server see each other's model calls through SharedCores; other servers' workers do not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cores import SharedCores

ROOT = Path(__file__).resolve().parent.parent
# A second worker process of the same server: holds a model call open until its stdin closes.
OTHER_WORKER = """
import sys
from service.cores import SharedCores
with SharedCores(2, 1, sys.argv[1]).call() as alone:
    print(alone, flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def key() -> str:
    return f"test-{os.getpid()}-{os.urandom(4).hex()}"


def test_a_call_runs_on_all_cores_only_while_no_other_worker_is_in_one(key) -> None:
    cores = SharedCores(2, 0, key)
    with cores.call() as alone:
        assert alone
    other = subprocess.Popen([sys.executable, "-c", OTHER_WORKER, key], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "True"  # this worker is idle
        assert cores.others_busy()
        with cores.call() as alone:
            assert not alone
    finally:
        other.communicate("")
    assert other.returncode == 0
    assert not cores.others_busy()
    cores.close()
    assert not cores.path.exists()


def test_other_servers_and_stale_flags_do_not_count(key) -> None:
    stale = SharedCores(2, 1, key)
    stale.flags[1] = 1  # a worker of an earlier server with this key, killed in a call
    restarted = SharedCores(2, 1, key)
    elsewhere = SharedCores(2, 1, key + "-other")
    cores = SharedCores(2, 0, key)
    with elsewhere.call(), cores.call() as alone:
        assert alone
    for shared in (cores, elsewhere, restarted, stale):
        shared.close()

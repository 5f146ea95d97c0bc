"""Workers of one server see each other's model calls through SharedCores; other servers' workers do not."""

import subprocess
import sys
from pathlib import Path

import pytest

from service.inference.cores import SharedCores

ROOT = Path(__file__).resolve().parent.parent
# A second worker process of the same server: holds a model call open until its stdin closes.
OTHER_WORKER = """
import sys
from pathlib import Path
from service.inference.cores import SharedCores
with SharedCores(Path(sys.argv[1]), 2, 1).call() as alone:
    print(alone, flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cores"


def test_a_call_runs_on_all_cores_only_while_no_other_worker_is_in_one(path) -> None:
    cores = SharedCores(path, 2, 0)
    with cores.call() as alone:
        assert alone
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_WORKER, str(path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
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


def test_other_servers_and_stale_flags_do_not_count(path) -> None:
    stale = SharedCores(path, 2, 1)
    stale.flags[1] = 1  # a worker of an earlier server with this file, killed in a call
    restarted = SharedCores(path, 2, 1)
    elsewhere = SharedCores(path.with_name("other-server"), 2, 1)
    cores = SharedCores(path, 2, 0)
    with elsewhere.call(), cores.call() as alone:
        assert alone
    for shared in (cores, elsewhere, restarted, stale):
        shared.close()

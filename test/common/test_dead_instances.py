"""The next start removes what an instance whose owner was killed left: by the pid in its name."""

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from lightvlm.common import shm
from lightvlm.workers.spawn import IPC_DIR_PREFIX, remove_dead_instances


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: nobody has this pid now (until it is reused, which names a live owner: kept)
    return process.pid


def test_instance_names_carry_the_owner_pid():
    name = shm.instance_name()
    assert name.split("x")[0] == str(os.getpid())
    assert not shm.instance_is_dead(name)
    assert shm.instance_is_dead(f"{dead_pid()}x{uuid.uuid4().hex[:6]}")
    assert not shm.instance_is_dead("a1b2c3d4")  # an old-style name: no pid, never swept


def test_segments_and_folders_of_dead_instances_are_removed_and_live_ones_kept():
    dead, live = f"{dead_pid()}x{uuid.uuid4().hex[:6]}", shm.instance_name()
    segments = [shm.create(f"lvlm{instance}_{kind}", 8) for instance in (dead, live) for kind in ("cpu", "b1_0")]
    folders = [Path(tempfile.mkdtemp(prefix=f"{IPC_DIR_PREFIX}{instance}-")) for instance in (dead, live)]
    try:
        remove_dead_instances()
        assert sorted(p.name for p in shm.SHM_DIR.glob(f"lvlm{dead}_*")) == []
        assert sorted(p.name for p in shm.SHM_DIR.glob(f"lvlm{live}_*")) == [f"lvlm{live}_b1_0", f"lvlm{live}_cpu"]
        assert not folders[0].exists() and folders[1].exists()
    finally:
        for segment in segments:
            segment.close()
        shm.sweep(f"lvlm{live}_")
        folders[1].rmdir()

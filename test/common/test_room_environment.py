"""Rooms start with OpenMP's spin time cut for cores they share, unless the user chose one."""

import os

import pytest

from lightvlm.workers.spawn import OMP_SPIN_COUNT, Rooms


def report_environment(path, writer):
    with open(path, "w") as f:
        f.write(f"{os.environ.get('GOMP_SPINCOUNT')} {os.environ.get('OMP_WAIT_POLICY')}")
    writer.close()


def child_sees(tmp_path) -> str:
    path = tmp_path / "env.txt"
    _, process, reader = Rooms().start("probe", report_environment, str(path))
    process.join(60)
    reader.close()
    assert process.exitcode == 0
    return path.read_text()


@pytest.mark.parametrize(("user", "expected"), [({}, f"{OMP_SPIN_COUNT} None"),
                                                 ({"GOMP_SPINCOUNT": "123"}, "123 None"),
                                                 ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE")])
def test_a_room_gets_the_short_spin_unless_the_user_set_one(monkeypatch, tmp_path, user, expected):
    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in user.items():
        monkeypatch.setenv(key, value)
    before = dict(os.environ)
    assert child_sees(tmp_path) == expected
    assert dict(os.environ) == before  # the starting process keeps its own environment

"""Atomic writes: a process killed while saving leaves the old file or the new one, whole."""

import os
import signal
import subprocess
import sys
import time

import pytest

import adaptc.atomic
from adaptc.atomic import atomic_write_bytes

WRITER = r"""
import importlib.util, sys
# Load the module by file: importing the adaptc package would import torch, slow for a subprocess.
spec = importlib.util.spec_from_file_location("atomic", sys.argv[2])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
atomic_write_bytes = atomic.atomic_write_bytes
path = sys.argv[1]
i = 0
while True:  # every version is a full block of one repeated byte, so a torn file is detectable
    i += 1
    atomic_write_bytes(path, bytes([i % 251]) * 4_000_000)
    if i == 3:
        open(path + ".ready", "w").close()
"""


def test_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_mode_is_that_of_a_plainly_created_file(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "atomic", b"x")
        (tmp_path / "plain").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode == 0o100640


@pytest.mark.integration
def test_killed_writer_leaves_a_complete_file(tmp_path):
    path = tmp_path / "f.bin"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), adaptc.atomic.__file__])
        try:
            while not os.path.exists(str(path) + ".ready"):
                assert proc.poll() is None, "the writer died on its own"
                time.sleep(0.01)
            time.sleep(0.05 * (attempt + 1))  # kill it somewhere inside a later write
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        data = path.read_bytes()
        assert len(data) == 4_000_000
        assert data == data[:1] * len(data)  # one version, not a mix of two
        os.unlink(str(path) + ".ready")

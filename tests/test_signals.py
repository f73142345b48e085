"""Offload files do not outlive their run: SIGTERM is handled like Ctrl-C, and the directory of a run killed
with SIGKILL is removed by the next start (its owner's pid is dead and its lock free)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flexgen_lite.engine.storage import DiskStore, remove_stale_stores


@pytest.fixture(scope="module")
def opt_dir(tiny_models):
    return str(tiny_models["opt"][0])


def start_generating(opt_dir: str, offload, tmp_path) -> subprocess.Popen:
    """A long `generate` run with everything on disk, started in its own process."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\n" * 5000)
    argv = [sys.executable, "-m", "flexgen_lite.cli", "generate", "--model", opt_dir, "--input", str(prompts),
            "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "50", "--dtype", "float32",
            "--percent", "0", "0", "0", "0", "0", "0", "--gpu-batch-size", "2", "--offload-dir", str(offload)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_offload_files(proc: subprocess.Popen, offload, timeout: float = 120) -> None:
    """Until the run has placed its weights on disk and written a result (it is generating)."""
    deadline = time.monotonic() + timeout
    out = offload.parent / "out.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        stores = list(offload.iterdir()) if offload.exists() else []
        if stores and any(any(s.iterdir()) for s in stores) and out.exists() and out.stat().st_size:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run did not start generating")


def test_sigterm_removes_offload_files_and_exits_143(opt_dir, tmp_path):
    offload = tmp_path / "offload"
    proc = start_generating(opt_dir, offload, tmp_path)
    wait_for_offload_files(proc, offload)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); offload files removed" in err and "Traceback" not in err
    assert not offload.exists()  # the folder the run made, with its files


def test_sigkill_leftovers_are_removed_by_the_next_start(opt_dir, tmp_path):
    offload = tmp_path / "offload"
    proc = start_generating(opt_dir, offload, tmp_path)
    wait_for_offload_files(proc, offload)
    proc.kill()
    proc.wait(timeout=30)
    (stale,) = offload.iterdir()
    assert stale.name.startswith(f"flexgen-lite-{proc.pid}-") and any(stale.iterdir())
    store = DiskStore(str(offload))
    assert [p.name for p in offload.iterdir()] == [os.path.basename(store.directory)]
    store.close()
    assert list(offload.iterdir()) == []


def test_live_owners_keep_their_directories(tmp_path):
    first = DiskStore(str(tmp_path))
    first.create(16, "x")
    second = DiskStore(str(tmp_path))
    assert os.path.isdir(first.directory) and os.path.isdir(second.directory)
    # a dead pid in the name is not enough: the lock of a live owner (here this process) keeps it
    renamed = tmp_path / "flexgen-lite-999999999-x"
    os.rename(first.directory, renamed)
    assert remove_stale_stores(str(tmp_path)) == [] and renamed.is_dir()
    os.rename(renamed, first.directory)
    first.close()
    second.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("interrupt,code", [("Terminated", 143), ("KeyboardInterrupt", 130)])
def test_an_interrupt_inside_a_locks_handling_still_ends_as_one(monkeypatch, capsys, interrupt, code):
    """SIGTERM or Ctrl-C raised while a thread waits on a Future can land inside threading's lock handling, which
    then raises "cannot release un-acquired lock" with the interrupt behind it (the full suite saw it once): the
    run still ends as interrupted, with its exit code, not with a traceback."""
    import argparse

    from flexgen_lite.cli import main as cli

    def waiting(args):
        try:
            raise {"Terminated": cli.Terminated, "KeyboardInterrupt": KeyboardInterrupt}[interrupt]()
        except KeyboardInterrupt:
            raise RuntimeError("cannot release un-acquired lock")  # noqa: B904 - as threading raises it

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=waiting)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    with pytest.raises(SystemExit) as ended:
        cli.main([])
    assert ended.value.code == code
    assert ("terminated (SIGTERM)" if code == 143 else "interrupted") in capsys.readouterr().err

    def failing(args):
        raise RuntimeError("a failure of its own")

    parser.set_defaults(func=failing)
    with pytest.raises(RuntimeError, match="of its own"):
        cli.main([])


def test_a_killed_profiles_probe_file_is_removed_by_the_next_start(tmp_path):
    """helper-37: a profile killed while probing the disk left its 256 MiB file, which nothing removed (its name
    held no pid). Probe files are named with their pid and locked while in use: a dead one's is removed where the
    next run or profile starts, a live one's kept."""
    from flexgen_lite.engine.storage import probe_file

    dead = tmp_path / "flexgen-lite-profile-999999999-disk-abc"
    dead.write_bytes(b"x" * 4096)
    with probe_file(str(tmp_path), "disk") as path:
        assert not dead.exists() and os.path.basename(path).startswith(f"flexgen-lite-profile-{os.getpid()}-disk-")
        renamed = tmp_path / "flexgen-lite-profile-999999998-disk-live"
        os.rename(path, renamed)  # a dead pid in the name is not enough: this process holds its lock
        assert remove_stale_stores(str(tmp_path)) == [] and renamed.exists()
        os.rename(renamed, path)
    assert list(tmp_path.iterdir()) == []
    DiskStore(str(tmp_path)).close()  # a run's offload store removes a dead probe's file too
    dead.write_bytes(b"x")
    DiskStore(str(tmp_path)).close()
    assert list(tmp_path.iterdir()) == []

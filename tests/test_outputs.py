"""Output sets under a stop: the signal handler's removal of temporary folders while threads still write."""
from __future__ import annotations

import threading
import time

import pytest

from diffim_dag.io import outputs
from diffim_dag.io.atomic import atomic_write_text
from diffim_dag.io.outputs import OutputError, make_folder, open_temporary, remove_temporaries, temporary_name


@pytest.fixture
def stoppable(monkeypatch):
    """remove_temporaries() marks the process as stopping: undone after the test."""
    monkeypatch.setattr(outputs, "_STOPPING", False)
    monkeypatch.setattr(outputs, "_OPEN", set())
    monkeypatch.setattr(outputs, "_CLEANUPS", {})


@pytest.mark.parametrize("where", [".", "plots"])
def test_a_temporary_set_removed_while_threads_write_into_it_stays_removed(stoppable, tmp_path, where):
    tmp = open_temporary(temporary_name(tmp_path / "out"))
    written = [0, 0]
    go = threading.Event()
    stop = threading.Event()

    def writer(k):
        go.wait()
        i = 0
        while not stop.is_set():
            try:  # as the FITS and parquet writers do: a folder made if missing, then an atomic file
                atomic_write_text(tmp / where / f"w{k}-{i % 20}.txt", "x" * 4096)
                written[k] += 1
            except (OSError, OutputError):  # the folder is gone, or refused: the command is stopping
                pass
            i += 1

    threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    go.set()
    try:
        deadline = time.monotonic() + 30.0
        while min(written) < 50:  # both writers are busy in the folder
            assert time.monotonic() < deadline, f"the writers did not get going: {written}"
            time.sleep(0.001)
        remove_temporaries()
        time.sleep(0.2)  # the writers go on trying, as a task does between the signal and the process's end
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_no_folder_is_made_once_the_command_is_stopping(stoppable, tmp_path):
    make_folder(tmp_path / "a" / "b")
    remove_temporaries()
    with pytest.raises(OutputError, match="stopping"):
        make_folder(tmp_path / "c")
    with pytest.raises(OutputError, match="stopping"):
        open_temporary(temporary_name(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

"""The command line's allocator settings (diffim_dag.memory.reuse_freed_memory): a large array freed by one step is
reused by the next without the system handing out (and zeroing) fresh pages, in a task thread as in a run.  Measured
in a child process, so that this test process's allocator stays as it was."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffim_dag.memory import _glibc, allocator_environment

pytestmark = pytest.mark.skipif(_glibc("mallopt") is None, reason="the C library is not glibc (no mallopt)")

_CHILD = """
import resource, sys, threading
import diffim_dag.cli  # as the command line starts: the settings come before NumPy (and OpenBLAS's threads)
from diffim_dag.memory import reuse_freed_memory
if sys.argv[1] == "tuned":
    assert "numpy" not in sys.modules
    assert reuse_freed_memory()
import numpy as np
faults = []
def task():  # the arrays of a task thread, as the pipeline's are
    a = np.ones(1 << 24, np.float32); del a  # 64 MB, as a 4096² plane
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        a = np.ones(1 << 24, np.float32); del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=task); t.start(); t.join()
print(faults[0])
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


def test_a_freed_plane_is_reused_without_new_page_faults():
    default, tuned = _faults("default"), _faults("tuned")
    # glibc's default maps each 64 MB array afresh (≥ 32 faults of 2 MB pages each time, 16k of 4 kB ones)
    assert default >= 64
    assert tuned < 32 and 4 * tuned < default


_TOUCH_CHILD = """
import resource, sys
import diffim_dag.cli  # as the command line starts
from diffim_dag import memory
assert memory.reuse_freed_memory() and memory.small_pages_for_arrays()  # (4 kB pages, as the command line's)
size = 256 << 20
if sys.argv[1] == "ahead":
    memory.touch_heap_ahead(size).join()
    assert memory.heap_touched_ahead() == size
import numpy as np
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(size // 4 - (16 << 20), np.float32)  # (numpy's own start may have taken some of the block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_memory_touched_ahead_is_reused_by_the_next_arrays():
    """``touch_heap_ahead`` faults its block on a thread and frees it into the heap: a 192 MB array made next fills
    those pages (a few faults, not one per 4 kB page)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _TOUCH_CHILD, mode], capture_output=True, text=True, env=env,
                             check=True)
        return int(out.stdout.split()[-1])

    fresh, ahead = faults("fresh"), faults("ahead")
    assert fresh > 40000  # (192 MB in 4 kB pages: 49152)
    assert ahead < fresh // 20


def test_nothing_is_touched_ahead_without_the_allocator_settings(monkeypatch):
    from diffim_dag import memory

    monkeypatch.setattr(memory, "_reusing", False)  # (a MALLOC_* variable of the user's, or not the command line)
    assert memory.touch_heap_ahead(1 << 20) is None and memory.heap_touched_ahead() == 0
    assert memory.TOUCH_AHEAD_MAX_BYTES < 1 << 30  # (below reuse_freed_memory's thresholds: from the heap, kept there)


def test_the_command_line_touches_ahead_twelve_planes_of_the_science_image(tmp_path, monkeypatch):
    import numpy as np
    from astropy.io import fits

    from diffim_dag import cli, memory

    fits.PrimaryHDU(np.zeros((30, 40), np.float32)).writeto(tmp_path / "s.fits")
    asked = []
    monkeypatch.setattr(memory, "touch_heap_ahead", asked.append)
    args = cli.build_parser().parse_args(["subtract", str(tmp_path / "s.fits"), str(tmp_path / "s.fits"),
                                          "--out", str(tmp_path / "out")])
    cli._touch_ahead(args)
    assert asked == [memory.TOUCH_AHEAD_PLANES * 4 * 30 * 40]
    cli._touch_ahead(cli.build_parser().parse_args(["subtract", str(tmp_path / "missing.fits"), "t.fits",
                                                    "--out", str(tmp_path / "out")]))
    assert len(asked) == 1  # (an unreadable header: nothing touched; the read task says what is wrong)


def test_settings_the_environment_makes_are_kept(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    env = allocator_environment()
    assert "MALLOC_ARENA_MAX" not in env
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(1 << 30)
    assert env["NUMPY_MADVISE_HUGEPAGE"] == "0"  # (LocalCluster workers load NumPy without the 2 MB page advice)
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    assert "NUMPY_MADVISE_HUGEPAGE" not in allocator_environment()


_ADVICE = """
import sys
import diffim_dag.cli
if sys.argv[1] == "numpy first":
    import numpy
from diffim_dag.memory import small_pages_for_arrays
applied = small_pages_for_arrays()
import numpy as np
multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
print(applied, multiarray._set_madvise_hugepage(False))  # (it returns the setting NumPy loaded with)
"""


@pytest.mark.parametrize("order, env, expected", [
    ("ours first", {}, "True False"),  # the command line: NumPy loads without the advice
    ("ours first", {"NUMPY_MADVISE_HUGEPAGE": "1"}, "False True"),  # the user's choice stands
    ("numpy first", {}, "False True"),  # too late (a host's NumPy): left with NumPy's default advice (Linux ≥ 4.6)
])
def test_numpy_arrays_stay_on_small_pages_unless_the_user_chose(order, env, expected):
    environ = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    out = subprocess.run([sys.executable, "-c", _ADVICE, order], capture_output=True, text=True, check=True,
                         env={**environ, **env})
    assert out.stdout.strip() == expected


def test_the_command_line_module_loads_no_numpy():
    # glibc gives a thread that allocates before the settings (OpenBLAS's, started when NumPy loads) an arena of its
    # own, and task threads then share it: 64 MB planes mapped afresh each time, whatever the settings
    code = "import sys, diffim_dag.cli; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False"


_MAIN = """
import os, sys
end = os._exit


def report(code):
    import numpy as np

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    print(os.environ.get("NUMPY_MADVISE_HUGEPAGE"), multiarray._set_madvise_hugepage(False), flush=True)
    end(code)


os._exit = report
sys.argv = ["diffim-dag", "subtract", sys.argv[1], sys.argv[2], "--out", sys.argv[3]]
import diffim_dag.cli

diffim_dag.cli.main()
"""


def test_the_command_lines_numpy_loads_without_the_huge_page_advice(tmp_path):
    """Through ``main`` as the command line runs it: its logging set-up imports astropy, which loads NumPy, and
    once ran before the settings, so NumPy had loaded with the advice and ``small_pages_for_arrays`` did nothing."""
    environ = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    missing = [str(tmp_path / name) for name in ("science.fits", "template.fits")]
    out = subprocess.run([sys.executable, "-c", _MAIN, *missing, str(tmp_path / "out")], capture_output=True,
                         text=True, env=environ)
    assert out.returncode == 2 and "science.fits" in out.stderr  # (a missing input: one line, after the set-up)
    assert out.stdout.split() == ["0", "False"]


def test_modules_imported_for_a_command_leave_the_collectors_passes():
    code = """
import gc
from diffim_dag.memory import imported_out_of_collection
with imported_out_of_collection():
    assert not gc.isenabled()
    import fractions  # (a module the child has not loaded)
print(gc.isenabled(), gc.get_freeze_count() > 1000)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_map_on_threads_keeps_the_order_and_uses_the_threads():
    """Results in the items' order whatever the threads; one worker (or one item) runs in the caller's thread."""
    import threading
    import time

    from diffim_dag.memory import map_on_threads

    def slow_square(i):  # later items finish first
        time.sleep(0.01 * (5 - i))
        return i * i, threading.current_thread().name

    one = list(map_on_threads(slow_square, range(5), 1))
    many = list(map_on_threads(slow_square, range(5), 3))
    assert [r for r, _ in one] == [r for r, _ in many] == [0, 1, 4, 9, 16]
    assert {name for _, name in one} == {threading.current_thread().name}
    assert all(name.startswith("diffim-map") for _, name in many)
    assert [name for _, name in map_on_threads(slow_square, [2], 4)] == [threading.current_thread().name]


def test_work_started_beside_the_caller_gives_its_result_or_its_error():
    import threading

    from diffim_dag.memory import started_on_thread

    for start in (True, False):
        ran_on = []
        done = started_on_thread(lambda: ran_on.append(threading.get_ident()) or 42, start)
        assert done() == 42 and done() == 42
        assert (ran_on == [threading.get_ident()]) is (not start)
    failed = started_on_thread(lambda: 1 / 0, True)
    with pytest.raises(ZeroDivisionError):
        failed()
    with pytest.raises(ZeroDivisionError):
        started_on_thread(lambda: 1 / 0, False)

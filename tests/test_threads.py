"""flexgen_lite bounds OpenMP's spin-wait before torch loads (a spinning pool beside another busy process made
decode 5-25x slower), leaves a user's own choice alone, and its C kernels share torch's OpenMP runtime rather
than bring their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flexgen_lite.kernels import native
from flexgen_lite.system import threads

SHOW = ("import json, os, flexgen_lite; print(json.dumps([{k: os.environ.get(k) for k in "
        "('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'KMP_BLOCKTIME')}, flexgen_lite.system.threads.applied()]))")


def _fresh(env: dict[str, str], code: str = SHOW):
    clean = {k: v for k, v in os.environ.items() if k not in threads.USER_CHOICES}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_flexgen_lite_bounds_the_spin_before_torch_loads():
    seen, applied = _fresh({})
    assert seen["GOMP_SPINCOUNT"] == threads.BOUNDED_SPIN["GOMP_SPINCOUNT"] and applied
    assert seen["KMP_BLOCKTIME"] == threads.BOUNDED_SPIN["KMP_BLOCKTIME"]


def test_a_users_choice_is_left_alone():
    seen, applied = _fresh({"OMP_WAIT_POLICY": "PASSIVE"})
    assert seen == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": None} and applied
    seen, _ = _fresh({"GOMP_SPINCOUNT": "300000"})
    assert seen["GOMP_SPINCOUNT"] == "300000" and seen["KMP_BLOCKTIME"] is None


def test_torch_loaded_first_is_reported():
    _, applied = _fresh({}, "import torch\n" + SHOW)
    assert not applied


def test_bound_spin_on_a_given_environment():
    env = {}
    assert threads.bound_spin(env) == threads.BOUNDED_SPIN == env
    assert threads.bound_spin({"KMP_BLOCKTIME": "0"}) == {}


def test_the_c_kernels_run_on_torchs_own_openmp_runtime_or_none():
    """gemv.c's teams are built with -fopenmp. Loaded beside torch their OpenMP calls bind to torch's libgomp, and
    teams run; where they bound to another runtime (a torch whose bundled libgomp has another name) no team runs at
    all: the work goes to the Python pool, and no second pool spins against torch's."""
    lib = native.library()
    if lib is None:
        return  # no compiler here: nothing built
    ours = native.build.runtime_file(lib, "GOMP_parallel")
    torchs = native.build.runtime_file(native.build.torch_library(), "omp_get_max_threads")
    assert torchs is not None and "omp" in Path(torchs).name, torchs
    assert native.team_threads() == (native.threads() if ours == torchs else 0), (ours, torchs)


ANOTHER_RUNTIME = """
import ctypes, json, os, shutil, sys
from pathlib import Path
import torch
torchs = next(line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line)
copy = shutil.copy(torchs, sys.argv[1])
ctypes.CDLL(copy)  # as scikit-learn's renamed libgomp, which transformers 5.17 imports with its tokenizers
from flexgen_lite.kernels import native
maps = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
print(json.dumps([len(maps), native.library() is not None and native._uses_openmp(), native.team_threads(),
                  native.threads()]))
"""


def test_another_runtime_loaded_beside_torchs_leaves_the_teams(tmp_path):
    """A second OpenMP runtime merely mapped (nothing of ours or torch's calls it) starts no pool: the teams still
    run on torch's (they once counted runtimes, and transformers 5.17's import of scikit-learn turned them off)."""
    out = subprocess.run([sys.executable, "-c", ANOTHER_RUNTIME, str(tmp_path / "libgomp-other.so.1")],
                         capture_output=True, text=True, check=True)
    runtimes, teams_built, team, threads_ = json.loads(out.stdout.strip().splitlines()[-1])
    assert runtimes == 2
    assert team == (threads_ if teams_built else 0) and (team > 0) == teams_built


# The build and its lock as library() runs them, of one small source (the whole set takes ~12 s to compile)
BUILD_AND_MAP = """
import os, sys
from pathlib import Path
from flexgen_lite.kernels import native
native.build.SOURCES = [native.build.SOURCES[0].with_name("elementwise.c")]
native.declared = lambda lib: lib
assert native.library() is not None
print([line for line in Path(f"/proc/{os.getpid()}/maps").read_text().splitlines() if "kernels-" in line][0])
"""


def test_processes_building_the_kernels_at_once_build_them_once(tmp_path):
    """Two processes with an empty cache (pytest's workers on a fresh machine): one builds, the other waits and
    loads the same file; neither has its library replaced under it (mapped from a deleted file)."""
    env = {**os.environ, "FLEXGEN_LITE_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_AND_MAP], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert all("(deleted)" not in out for out, _ in outs), outs
    assert len(list((tmp_path / "native").glob("kernels-*.so"))) == 1


def test_kernels_use_torchs_thread_count_when_openmp_binds_threads():
    """With OMP_PROC_BIND the OpenMP runtime pins the main thread to one CPU (its team to the others), so the main
    thread's affinity is not the process's CPUs: the C kernels still take torch's count (they ran on one thread,
    1.6x slower decode steps, before)."""
    code = ("import json, os, torch; from flexgen_lite.kernels import native; torch.ones(4).sum(); "
            "print(json.dumps([native.threads(), torch.get_num_threads(), len(os.sched_getaffinity(0))]))")
    ours, torchs, _ = _fresh({"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}, code)
    assert ours == torchs >= 1
    unbound, torchs, cpus = _fresh({}, code)
    assert unbound == min(torchs, cpus)

"""Threads: the worker pool, how thread counts combine with threadpoolctl and
``fd.num_threads``, fork safety, and the private kernels' entry checks.

Results must be bit-identical whatever the thread count and whoever does which
chunk; speed is never asserted here (BENCHMARKS.md has the figures).
"""

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import fastdescent as fd
from fastdescent import _config, _dispatch, _runtime

needs_two_threads = pytest.mark.skipif(
    not _runtime.openmp_enabled() or _config.max_threads() < 2, reason="needs OpenMP and 2 usable cores"
)


@pytest.fixture(autouse=True)
def kernel_backend():
    """The faces here run on the kernels' worker pool, whatever the default backend
    (CI also runs the suite with the reference backend as the default)."""
    previous = _config.CALL_DEFAULTS.default_backend  # (None: from the environment)
    fd.set_backend("kernel")
    yield
    fd.set_backend(previous)


def sgd_inputs(rng, n, dtype=np.float32):
    return rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)


# --- the private kernels refuse mismatched lists (issue 14 #8) -------------------


@pytest.mark.parametrize("n_params, n_grads", [(3, 1), (1, 3), (2, 0)])
def test_private_kernel_refuses_mismatched_list_lengths(n_params, n_grads, rng):
    """Positional call of the private kernel: 3 params and 1 grad used to read past the list."""
    params = [rng.standard_normal(1000).astype(np.float32) for _ in range(n_params)]
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(n_grads)]
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match="arrays for"):
        _dispatch.kernels.sgd(params, grads, None, lr=0.1, grad_scale=1.0, weight_decay=0.0, momentum=0.0,
                              dampening=0.0, nesterov=False, classical=False, first_step=False, n_threads=2)
    for p, b in zip(params, before):
        assert p.tobytes() == b.tobytes()


def test_private_kernel_refuses_a_short_state_list(rng):
    params = [rng.standard_normal(100).astype(np.float32) for _ in range(3)]
    grads = [rng.standard_normal(100).astype(np.float32) for _ in range(3)]
    with pytest.raises(ValueError, match="arrays for"):
        _dispatch.kernels.sgd(params, grads, [np.zeros(100, np.float32)], lr=0.1, grad_scale=1.0,
                              weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
                              classical=False, first_step=False, n_threads=1)


@pytest.mark.parametrize("missing", ["grads", "exp_avg"])
def test_private_kernel_refuses_a_missing_required_list(missing, rng):
    """None for a list every step reads used to reach the element loop as a NULL pointer."""
    lists = {name: [rng.standard_normal(100).astype(np.float32)] for name in ("params", "grads", "exp_avg", "exp_avg_sq")}
    lists[missing] = None
    before = lists["params"][0].copy()
    with pytest.raises(TypeError):
        _dispatch.kernels.adam(*lists.values(), lr=0.1, step_size=0.1, inv_bias_correction2_sqrt=1.0, beta1=0.9,
                               beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=False, grad_scale=1.0, n_threads=1)
    assert lists["params"][0].tobytes() == before.tobytes()


def test_private_norm_kernel_takes_a_list(rng):
    with pytest.raises(TypeError):
        _dispatch.kernels.max_abs((rng.standard_normal(10),), n_threads=1)


# --- thread counts: threadpoolctl, num_threads, set_num_threads -------------------


@needs_two_threads
def test_threadpoolctl_limits_fastdescent_as_it_limits_openmp_libraries():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    assert fd.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert fd.get_num_threads() == 1
        assert fd.effective_n_threads(None) == 1
        assert fd.effective_n_threads(-1) == 1
        with fd.num_threads(2):  # threadpoolctl is a ceiling: a request cannot exceed it
            assert fd.get_num_threads() == 1
    assert fd.get_num_threads() == 2


@needs_two_threads
def test_num_threads_blocks_in_two_python_threads_do_not_interfere():
    """Overlapping ``with fd.num_threads`` blocks used to leave the default at 1 (issue 14 #10)."""
    entered, left_first = threading.Barrier(2), threading.Event()
    seen = {}

    def first():
        with fd.num_threads(1):
            entered.wait()
            seen["first inside"] = fd.get_num_threads()
        left_first.set()

    def second():
        entered.wait()
        with fd.num_threads(2):
            left_first.wait()
            seen["second inside"] = fd.get_num_threads()
        seen["second after"] = fd.get_num_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {"first inside": 1, "second inside": 2, "second after": 2}
    assert fd.get_num_threads() == 2


def test_set_num_threads_is_process_wide_and_num_threads_overrides_it_per_thread():
    fd.set_num_threads(1)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("other", fd.get_num_threads()))
    with fd.num_threads(-1):
        worker.start()
        worker.join(30)
        assert fd.get_num_threads() == _config.max_threads()
    assert result["other"] == 1 and fd.get_num_threads() == 1


# --- the worker pool: any chunking gives the same bits ----------------------------


def adam_run(n_threads, params, grads, steps=3):
    p = [x.copy() for x in params]
    m = [np.zeros_like(x) for x in params]
    v = [np.zeros_like(x) for x in params]
    for t in range(1, steps + 1):
        fd.adam_step(p, grads, m, v, step=t, lr=1e-2, n_threads=n_threads)
    return [x.tobytes() for x in p + m + v]


@needs_two_threads
@pytest.mark.parametrize("spin", [0.0, 1.0], ids=["parked workers", "spinning workers"])
def test_sleeping_or_spinning_workers_give_identical_results(spin, rng, tiny_parts):
    kernels = _dispatch.kernels
    sizes = [1, 63, 64, 65, 1000, 4097, 30_000]
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    serial = adam_run(1, params, grads)
    previous = kernels.get_spin_seconds()
    kernels.set_spin_seconds(spin)
    try:
        for _ in range(5):
            assert adam_run(2, params, grads) == serial
    finally:
        kernels.set_spin_seconds(previous)


@needs_two_threads
@pytest.mark.parametrize("n", [100_003, 1_000_003], ids=["chunked by tiny parts", "default chunks"])
def test_alternating_order_gives_identical_results(n, rng, request):
    """Back-to-back calls on the same arrays alternate directions (each thread
    starts on the chunks it ran last): the same bits as front to back, alone or on
    the pool, whichever thread runs which chunk."""
    if n < 1_000_000:
        request.getfixturevalue("tiny_parts")
    kernels = _dispatch.kernels
    params, grads = [rng.standard_normal(n).astype(np.float32)], [rng.standard_normal(n).astype(np.float32)]
    try:
        kernels.set_alternating_order(False)
        assert not kernels.pool_state()["alternating_order"]
        expected = adam_run(1, params, grads, steps=4)
        reversed_before = kernels.pool_state()["reversed_jobs"]
        kernels.set_alternating_order(True)
        assert kernels.pool_state()["alternating_order"]
        for n_threads in (1, 2, 2, 1):
            assert adam_run(n_threads, params, grads, steps=4) == expected
        # steps 2 and 4 of each 1-thread run (a 2-thread run's policy may go serial for a step under load)
        assert kernels.pool_state()["reversed_jobs"] >= reversed_before + 4
    finally:
        kernels.set_alternating_order(True)


@needs_two_threads
def test_concurrent_calls_from_python_threads_are_each_correct(rng, tiny_parts):
    """Two Python threads share one pool: whoever finds it busy runs alone, correctly."""
    jobs = []
    for _ in range(4):
        params = [rng.standard_normal(50_000).astype(np.float32) for _ in range(3)]
        grads = [rng.standard_normal(50_000).astype(np.float32) for _ in range(3)]
        jobs.append((params, grads, adam_run(1, params, grads)))
    failures = []

    def run(job):
        params, grads, expected = job
        for _ in range(20):
            if adam_run(2, params, grads) != expected:
                failures.append(job)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures


@needs_two_threads
def test_norms_are_identical_with_parked_and_spinning_workers(rng, tiny_parts):
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (10, 5000, 40_000)]
    expected = fd.global_norm(arrays, n_threads=1)
    kernels = _dispatch.kernels
    previous = kernels.get_spin_seconds()
    try:
        for spin in (0.0, 1.0):
            kernels.set_spin_seconds(spin)
            assert fd.global_norm(arrays, n_threads=2) == expected
    finally:
        kernels.set_spin_seconds(previous)


@pytest.mark.parametrize("policy, spin", [("passive", 0.0), ("active", float("inf")), ("", 1e-3)])
def test_omp_wait_policy_sets_how_long_idle_workers_spin(policy, spin):
    env = dict(os.environ, OMP_WAIT_POLICY=policy, PYTHONPATH=os.pathsep.join(sys.path))
    code = "from fastdescent import _dispatch; print(_dispatch.kernels.get_spin_seconds())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) == spin


def test_spin_time_is_validated():
    with pytest.raises(ValueError):
        _dispatch.kernels.set_spin_seconds(-1.0)
    with pytest.raises(ValueError):
        _dispatch.kernels.set_spin_seconds(float("nan"))
    assert set(_dispatch.kernels.pool_state()) >= {"workers", "parked", "jobs", "wakeups", "backoffs"}


# --- the policy: wake parked workers only when it pays (issue 20) ------------------


@pytest.fixture
def parked_pool():
    """A started pool whose workers are all parked (spin 0), back-offs off, and the
    policy's estimates restored afterwards."""
    kernels = _dispatch.kernels
    state = kernels.pool_state()
    spin = kernels.get_spin_seconds()
    thresholds = (kernels.get_min_elements_per_thread(), kernels.get_min_elements_per_thread(cold=True))
    kernels.set_spin_seconds(0.0)
    kernels.set_overload_backoff(False)
    p = np.ones(1 << 16, np.float32)
    kernels.set_min_elements_per_thread(1024, 1024)
    try:
        fd.sgd_step([p], [p.copy()], lr=0.0, n_threads=2)   # starts the workers
        # Parked for 50 ms in a row: a worker still on its way back from a wake-up
        # counts as parked until it runs, and would then run.
        deadline, parked_since = time.monotonic() + 10, time.monotonic()
        while time.monotonic() - parked_since < 0.05 and time.monotonic() < deadline:
            time.sleep(0.005)
            if kernels.pool_state()["parked"] < kernels.pool_state()["workers"]:
                parked_since = time.monotonic()
        kernels.set_min_elements_per_thread(*thresholds)
        time.sleep(0.002)   # not back to back
        yield kernels
    finally:
        kernels.set_min_elements_per_thread(*thresholds)
        kernels.set_wake_estimates(state["wake_latency"], state["wake_cost"], state["rate"])
        kernels.set_overload_backoff(state["backoff_enabled"])
        kernels.set_spin_seconds(spin)


@needs_two_threads
def test_parked_workers_are_woken_only_when_the_measured_wake_up_pays(parked_pool):
    kernels = parked_pool
    assert kernels.pool_state()["parked"] == kernels.pool_state()["workers"] >= 1
    # 1 thread updates 10**9 elements a second: 2**16 take 66 us alone.
    kernels.set_wake_estimates(latency=1e-3, cost=5e-6, rate=1e9)
    assert kernels.parts_for(1 << 16, 2) == 1         # a worker 1 ms late comes after the end
    assert kernels.parts_for(1 << 20, 2) == 1         # ... or too late to halve 1 ms of work
    assert kernels.parts_for(1 << 22, 2) == 2         # 4 ms: pays
    kernels.set_wake_estimates(latency=5e-3)            # a busy machine
    assert kernels.parts_for(1 << 21, 2) == 1
    assert kernels.parts_for(1 << 22, 2) == 2         # parts of 2**21: always woken
    assert kernels.parts_for(1 << 16, 1) == 1
    kernels.set_wake_estimates(latency=5e-6, cost=1e-6, rate=1e9)
    assert kernels.parts_for(1 << 16, 2) == 2         # a quick wake-up pays for 66 us of work
    assert kernels.parts_for(1 << 14, 2) == 1         # but never below the warm threshold
    kernels.set_wake_estimates(latency=3e-5, cost=5e-6, rate=1e9)
    # 30 us late, 5 us to wake, 16 us of the last chunk: pays from about 90 us of work.
    assert kernels.parts_for(65_536, 2) == 1 and kernels.parts_for(120_000, 2) == 2


@needs_two_threads
def test_wake_up_hint_wakes_parked_workers_and_changes_no_result(parked_pool, rng):
    kernels = parked_pool
    kernels.set_spin_seconds(1.0)   # woken workers now stay up
    kernels.set_wake_estimates(latency=5e-5, cost=5e-6, rate=1e9)
    params = [rng.standard_normal(70_000).astype(np.float32)]
    grads = [rng.standard_normal(70_000).astype(np.float32)]
    serial = adam_run(1, params, grads)
    hints = kernels.pool_state()["hints"]
    assert not kernels.prepare_threads(10**7, 1)       # one thread: nothing to wake
    assert not kernels.prepare_threads(40_000, 2)      # 5 us to wake them: 12% of 40 us of work
    assert kernels.pool_state()["parked"] >= 1
    assert kernels.prepare_threads(10**7, 2)
    deadline = time.monotonic() + 5
    while kernels.pool_state()["parked"] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert kernels.pool_state()["parked"] == 0 and kernels.pool_state()["hints"] == hints + 1
    assert kernels.parts_for(70_000, 2) == 2            # awake: a mid-sized update takes them
    assert adam_run(2, params, grads) == serial
    assert kernels.prepare_threads(70_000, 2)           # spinning: kept spinning
    assert adam_run(2, params, grads) == serial


@needs_two_threads
def test_workers_spin_longer_after_large_updates_when_calls_come_back_soon(rng):
    """After a job, workers spin up to 16 times its serial time (at most 50 ms) if
    the gap before it was that short: never longer with OMP_WAIT_POLICY=passive's
    spin of 0, after a short update, or after a gap longer than the budget."""
    kernels = _dispatch.kernels
    state, spin = kernels.pool_state(), kernels.get_spin_seconds()
    p, g = sgd_inputs(rng, 1 << 20)

    def step(rate):
        # 10**8 a second: 2**20 take 10 ms alone; a quick wake-up: parked workers are woken
        kernels.set_wake_estimates(latency=1e-5, cost=1e-6, rate=rate)
        fd.sgd_step([p], [g], lr=0.0, n_threads=2)
        return kernels.pool_state()["long_spins"]

    kernels.set_overload_backoff(False)        # a descheduled spin would park at once
    try:
        kernels.set_spin_seconds(1e-3)
        step(1e8)
        spins = step(1e8)
        assert spins == kernels.pool_state()["long_spins"] >= 1
        # (Whether the workers are still spinning 5 ms later depends on the machine's
        # load, which can take their core: the decision is what this test checks;
        # bench --cases threads counts the wake-ups it saves.)
        time.sleep(0.005)                       # past the 1 ms spin, well within 50 ms
        spins = step(1e8)                       # asks again
        assert step(1e11) == spins              # 10 us of work, back to back: the 1 ms spin covers it
        time.sleep(0.06)
        assert step(1e8) == spins               # the gap was longer than any budget
        kernels.set_spin_seconds(0.0)
        step(1e8)
        assert step(1e8) == spins
    finally:
        kernels.set_wake_estimates(state["wake_latency"], state["wake_cost"], state["rate"])
        kernels.set_overload_backoff(state["backoff_enabled"])
        kernels.set_spin_seconds(spin)


def test_policy_estimates_are_reported_and_validated():
    kernels = _dispatch.kernels
    state = kernels.pool_state()
    assert state["wake_latency"] > 0 and state["wake_cost"] > 0 and state["rate"] > 0
    with pytest.raises(ValueError):
        kernels.set_wake_estimates(latency=-1.0)


# --- fork safety (issue 14 #3) -----------------------------------------------------

FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import fastdescent as fd

    def adam(n_threads):
        rng = np.random.default_rng(7)
        p, g = rng.standard_normal(2_000_000).astype(np.float32), rng.standard_normal(2_000_000).astype(np.float32)
        m, v = np.zeros_like(p), np.zeros_like(p)
        for t in range(1, 4):
            fd.adam_step(p, g, m, v, step=t, lr=1e-2, n_threads=n_threads)
        return p.tobytes() + m.tobytes() + v.tobytes()

    parent = adam(2)                      # the parent ran the worker threads
    assert parent == adam(1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                          # the child: a 2-thread-sized update
        os.close(read)
        ok = adam(2) == parent and adam(2) == parent
        os.write(write, b"ok" if ok else b"WRONG")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 16)
    os.waitpid(pid, 0)
    print(answer.decode())
    """
)


@needs_two_threads
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_threaded_kernels_correctly():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen([sys.executable, "-c", FORK_SCRIPT], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the parent and the hung child
        process.communicate()
        pytest.fail("the forked child hung in a threaded kernel")
    assert process.returncode == 0, err
    assert out.strip() == "ok"


# --- the threading sweep of the bench command ------------------------------------


def test_threads_sweep_runs_renders_and_reloads(tmp_path, capsys):
    from fastdescent.__main__ import main

    path = tmp_path / "sweep.json"
    assert main(["bench", "--cases", "threads", "--sweep-sizes", "4e3", "--sweep-gaps", "0.001",
                 "--repeats", "1", "--sweep-idle-repeats", "2", "--min-time", "0", "--quiet",
                 "--sweep-fixed-order", "--json", str(path)]) == 0
    live = capsys.readouterr().out
    assert "back to back" in live and "after 1 ms of NumPy matrix products" in live and "vs fused" in live
    assert "fixed 2thr" in live and "alt gain" in live
    assert _dispatch.kernels.pool_state()["alternating_order"]  # restored after the fixed-order contender
    import json

    sweep = json.loads(path.read_text())["threads"]
    assert sweep["gaps"] == [0.0, 0.001] and sweep["gap_work"] == "matmul" and sweep["gap_blas_threads"] == 1
    assert "(8 MB, 1 BLAS thread)" in live
    assert all(r["gap_mean"] >= 0.001 for r in sweep["records"] if r.get("gap") == 0.001 and "seconds" in r)
    timed = {(r["method"], r["threads"], r["gap"]) for r in sweep["records"] if "seconds" in r}
    assert ("kernel", 1, 0.0) in timed and ("kernel", 1, 0.001) in timed
    assert ("kernel-fixed-order", 2, 0.0) in timed and ("kernel-fixed-order", 2, 0.001) in timed
    assert " woke " in live   # after a gap: calls that woke parked workers, of those run on the pool
    for r in sweep["records"]:
        if r.get("gap") == 0.001 and r["method"] == "kernel" and r["threads"] > 1 and "seconds" in r:
            assert 0 <= r["pool"]["wakeups"] <= r["pool"]["jobs"]
    assert main(["bench", "--from-json", str(path)]) == 0
    assert capsys.readouterr().out == live


@pytest.mark.parametrize("kind", ["matmul", "spin"])
def test_sweep_gap_work_lasts_at_least_the_gap(kind):
    from fastdescent.bench.threads import GapWork

    work = GapWork(kind)
    assert all(work(0.002) >= 0.002 for _ in range(3))
    with pytest.raises(ValueError):
        GapWork("sleep")


def test_sweep_goals():
    from fastdescent.bench.threads import goal

    assert goal(2**17, 0.0, 1.9, 1.6) == "ok" and goal(2**17, 0.0, 1.9, 1.4) == "MISSED"
    assert goal(2**22, 0.0, 1.0, 1.1) == "ok" and goal(2**14, 0.0, 0.5, 0.5) == ""
    assert goal(2**14, 0.005, 0.96, 1.0) == "ok" and goal(2**24, 0.02, 0.94, 2.0) == "MISSED"
    assert goal(10**8, 0.0, 0.96, 0.8) == "ok" and goal(10**8, 0.02, 0.9, 1.2) == "MISSED"


PINNED_SCRIPT = textwrap.dedent(
    """
    import os
    import numpy as np
    import fastdescent as fd
    from fastdescent import _dispatch

    def allowed_cpus():
        found = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/status") as f:
                found[tid] = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))
        return found

    before = allowed_cpus()
    _dispatch.kernels.set_min_elements_per_thread(1)
    p, g = np.ones(100_000, np.float32), np.ones(100_000, np.float32)
    fd.sgd_step(p, g, lr=0.5, n_threads=2)
    assert (p == 0.5).all()
    workers = sorted(cpus for tid, cpus in allowed_cpus().items() if tid not in before)
    print(before[str(os.getpid())], *workers)
    """
)


@needs_two_threads
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_are_not_pinned_to_the_importing_threads_cpu():
    """OMP_PROC_BIND pins the importing thread to one CPU; its workers must not inherit that."""
    env = dict(os.environ, OMP_PROC_BIND="close", OMP_PLACES="cores", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("OMP_NUM_THREADS", None)
    env.pop("FASTDESCENT_BACKEND", None)  # the workers belong to the kernels (CI also runs the reference backend)
    main, *workers = subprocess.run([sys.executable, "-c", PINNED_SCRIPT], env=env, capture_output=True,
                                    text=True, check=True, timeout=60).stdout.split()
    assert len(workers) == 1 and workers[0] != main

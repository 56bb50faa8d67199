"""Cluster set-up: the one place that makes a Dask client (with :mod:`diffim_dag.graph`, the only code that
imports dask, distributed or dask-kubernetes).

:func:`open_client` serves every command: a new LocalCluster, an existing scheduler's address, or a
dask-kubernetes operator cluster (``kubernetes://NAME?n_workers=…``), each watched by a
:class:`WorkerWatchdog` so that a cluster left without workers ends the run instead of hanging.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from typing import Any

from .config import LOCAL_CLUSTER, ClusterConfig
from .errors import DiffimError

__all__ = ["open_client", "make_client", "scheduler_for", "kubernetes_cluster", "WorkerWatchdog",
           "set_stall_handler", "performance_report", "worker_name", "as_completed", "dashboard_link",
           "worker_profiling"]

log = logging.getLogger(__name__)


class WorkerWatchdog:
    """Ends a run whose cluster has had no worker for ``timeout`` seconds instead of letting it hang.

    A LocalCluster whose workers all died (killed, out of memory, a stalled event loop the scheduler
    gave up on) leaves ``Client.gather`` waiting forever.  A daemon thread polls the client's view of
    the scheduler every second and calls ``on_stall(message)`` once the worker count has stayed at 0
    for ``timeout`` s (the CLI's handler prints the one line, removes temporary outputs and exits;
    the default interrupts the main thread).
    """

    def __init__(self, client, timeout: float, on_stall=None):
        import threading

        self.client = client
        self.timeout = float(timeout)
        self.on_stall = on_stall or _STALL["handler"] or _interrupt_main
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffim-dag-watchdog", daemon=True)

    def start(self) -> WorkerWatchdog:
        if self.timeout > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _workers(self) -> int | None:
        try:
            return len(self.client.scheduler_info().get("workers", {}))
        except Exception:  # noqa: BLE001 - a client mid-shutdown: nothing to watch
            return None

    def _run(self) -> None:
        import time

        since = None
        while not self._stop.wait(1.0):
            n = self._workers()
            if n is None or n > 0:
                since = None
                continue
            since = time.monotonic() if since is None else since
            if time.monotonic() - since >= self.timeout:
                self.on_stall(f"the Dask cluster has had no worker for {self.timeout:g} s (all workers died?); "
                              "stopping instead of waiting forever")
                return


def _interrupt_main(message: str) -> None:
    import _thread

    log.error("%s", message)
    _thread.interrupt_main()


_STALL = {"handler": None}


def set_stall_handler(function) -> None:
    """What every :class:`WorkerWatchdog` calls when its cluster stalls (the CLI ends the command)."""
    _STALL["handler"] = function


def make_client(scheduler: str | None = None, *, n_workers: int | None = None, threads_per_worker: int = 1,
                memory_limit: str = "auto", dashboard_address: str | None = None):
    """``(client, cluster)``: connect to ``scheduler``, or start a LocalCluster (cluster is None when connecting;
    ``dashboard_address``: its Dask dashboard, none by default).

    The workers' environment and start method: :func:`prepare_local_workers`.
    """
    import dask
    from distributed import Client, LocalCluster

    if not logging.getLogger("diffim_dag").isEnabledFor(logging.DEBUG):
        logging.getLogger("distributed").setLevel(logging.WARNING)  # the in-process scheduler's INFO chatter
    if scheduler:
        return Client(scheduler), None
    method = prepare_local_workers()
    n = n_workers or os.cpu_count() or 1
    # each worker process (a restarted one too) runs this module's dask_setup as it starts, after the preloads the
    # user's Dask config names (distributed.worker.preload)
    configured = dask.config.get("distributed.worker.preload", default=None) or []
    preload = [*([configured] if isinstance(configured, str) else configured), __name__]
    # (each Nanny hands the workers it starts, a restarted one too, the Dask config it was made under)
    with dask.config.set({"distributed.worker.profile.enabled": worker_profiling(dashboard_address),
                          WORK_STEALING: work_stealing(), TICK_INTERVAL: event_loop_tick(), START_METHOD: method}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True,
                               memory_limit=memory_limit, dashboard_address=dashboard_address, preload=preload)
    return Client(cluster), cluster


#: The scheduler's config key that moves tasks already given to a worker to another, idle one.
WORK_STEALING = "distributed.scheduler.work-stealing"


def work_stealing() -> bool:
    """Whether a new LocalCluster's scheduler steals work (``distributed.scheduler.work-stealing``): off, unless the
    user's Dask config files or ``DASK_*`` environment say otherwise.

    A batch's visits are independent chains whose tasks read their own inputs and hand on whole planes: a stolen
    task takes its visit's planes to the other worker.  6 visits of 2048² on 2 workers: with stealing, 3 batches of 8
    moved 0.16, 1.09 and 1.09 GB between the workers and took 22.1, 16.6 and 21.3 s (the other 5: 12.4–15.7 s);
    without, none of 8 moved anything (12.6–18.2 s).  The scheduler still gives each task, when it becomes ready,
    to the worker that holds its inputs or is idle.  (A scheduler of the user's keeps its own setting: the Kubernetes
    manifests and :func:`kubernetes_cluster` set it off in the scheduler's environment.)
    """
    stated = _users_setting(WORK_STEALING)
    return False if stated is None else stated


def prepare_local_workers() -> str:
    """Ready this process to start a LocalCluster's workers; returns their start method
    (:func:`worker_start_method`).

    The workers' environment: one FFT/BLAS thread each (``OMP_NUM_THREADS=1`` etc.), so that they do not
    oversubscribe the cores, and the command line's allocator settings
    (:func:`~diffim_dag.memory.allocator_environment`: freed arrays reused, not fresh pages; arrays on 4 kB pages),
    which must be in a process's environment when it starts (variables already set are kept).  Then, for
    ``forkserver``, the server they are forked from (:func:`start_worker_server`).  ``diffim-dag run`` calls this
    as it starts, so that the server imports the task modules while the command loads its own."""
    from .memory import allocator_environment

    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **allocator_environment()}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    method = worker_start_method()
    if method == "forkserver":
        try:
            start_worker_server()
        except OSError as exc:  # (no socket for the server: a read-only or full temporary folder) spawn them
            log.warning("could not start the workers' fork server (%s); starting each worker on its own", exc)
            method = "spawn"
    return method


#: The config key for how a new LocalCluster's nannies start their worker processes.
START_METHOD = "distributed.worker.multiprocessing-method"


def worker_start_method() -> str:
    """How a new LocalCluster starts its worker processes (``distributed.worker.multiprocessing-method``):
    ``forkserver`` where the platform has it (:func:`start_worker_server`), unless the user's Dask config files or
    ``DASK_*`` environment name a method; else ``spawn``, distributed's default.

    A spawned worker is a new interpreter that imports distributed (0.3 s of CPU) and then the task modules
    (:func:`import_task_modules`, 0.7 s) before and during its first tasks: a second of CPU per worker, taken
    from the tasks while the cores are busy.  Forked from a server process that imported them once, the workers
    start with everything loaded (a LocalCluster's start-up 0.3–0.55 s instead of 0.95–1.2 s), and share those
    modules' memory.  ``diffim-dag run`` on 6 visits of 2048², interleaved with spawned workers: 0.960× the wall
    time on 2 workers (6 pairs), 0.976× on 1 (5 pairs).  (A worker that its nanny restarts later is spawned: the
    method is chosen by the config in force when a worker starts.)
    """
    import multiprocessing

    stated = _users_value(START_METHOD)
    if stated:
        return str(stated)
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def start_worker_server() -> None:
    """Start this process's multiprocessing fork server, which the workers of a LocalCluster are forked from, with
    distributed and the task modules imported (:func:`task_module_names`); a server already running is kept.

    The server takes this process's environment as it starts (:func:`prepare_local_workers` sets the workers' thread
    and allocator variables first; the C library and NumPy read them then, and forked workers inherit what they set)
    and ends with this process.  A module whose import raises ImportError there is skipped (a task that needs it
    imports it on its worker, and says why it fails)."""
    import multiprocessing
    from multiprocessing import forkserver

    # (distributed sets a preload list of its own as it starts its first worker: by then this server is running)
    multiprocessing.get_context("forkserver").set_forkserver_preload(["distributed", __name__, *task_module_names()])
    forkserver.ensure_running()


def _exit_fork_server_at_once() -> bool:
    """In the process :func:`start_worker_server` starts (importing this module among its preloads, inside
    :func:`multiprocessing.forkserver.main`), have its exit be ``os._exit(0)`` instead of the interpreter's teardown;
    anywhere else, nothing.  Returns whether it did.

    The server ends when the command's process has ended (it reads the end of a pipe).  It holds the command's
    standard output and error, so a caller that reads them (a terminal multiplexer, ``| tee``, a workflow manager,
    ``subprocess.run(capture_output=True)``) waited on top for the teardown of its ~1500 modules: 0.29–0.50 s of
    every ``diffim-dag run`` on a LocalCluster.  The server holds nothing to finish: no file, no child (its forked
    workers have ended, and its listening socket's file is the command's to remove).  Its forked children do not
    run it: they end with ``os._exit`` from the fork server's loop."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            import atexit

            atexit.register(_exit_now)
            return True
        frame = frame.f_back
    return False


def _exit_now(code: int = 0) -> None:
    """End this process with ``code`` now, its standard streams flushed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)


def _users_value(key: str):
    """A Dask setting as the user's config files and ``DASK_*`` environment state it (not this process's
    defaults or overrides); None where they do not."""
    import dask

    try:
        return dask.config.get(key, config=dask.config.collect())
    except KeyError:
        return None


def _users_setting(key: str) -> bool | None:
    """A true/false Dask setting as the user's config files and ``DASK_*`` environment state it (not this process's
    defaults or overrides); None where they do not."""
    stated = _users_value(key)
    if isinstance(stated, str):  # (an environment variable that is not a Python literal: "false", "yes")
        return stated.strip().lower() in ("true", "1", "yes", "on")
    return None if stated is None else bool(stated)


#: The config key of how often a Dask server's event loop wakes to measure its own responsiveness.
TICK_INTERVAL = "distributed.admin.tick.interval"


def event_loop_tick():
    """How often the event loops of a new LocalCluster's scheduler, nannies and workers wake to measure their own
    responsiveness (``distributed.admin.tick.interval``): every 500 ms instead of Dask's 20 ms, unless the user's
    Dask config files or ``DASK_*`` environment state it (their value, as they give it).

    Each wake-up takes the interpreter lock from a worker's task thread (as the statistical profiler does,
    :func:`worker_profiling`), fifty times a second; the tick only feeds a health metric and the "event loop was
    unresponsive" message (after 3 s, which a 500 ms tick still reports).  An idle worker's event loop used 1.6–1.9 %
    of a core with it, 0.7–0.8 % without.  ``diffim-dag run`` on 6 visits of 2048², interleaved: 0.951× and 0.946×
    the wall time on 2 workers (medians of 8 and 6 pairs), 0.990× on 1 (4 pairs)."""
    stated = _users_value(TICK_INTERVAL)
    return "500ms" if stated is None else stated


def worker_profiling(dashboard_address: str | None) -> bool:
    """Whether a new LocalCluster's workers run Dask's statistical profiler (``distributed.worker.profile``).

    The profiler samples the stacks of a worker's task threads every 10 ms, taking the interpreter lock from the
    task each time, for the dashboard's Profile page.  Without a dashboard nobody reads it: off (6 visits of
    2048² on 2 workers: 12.9 s against 13.2–13.5 s, the workers' CPU time 0.97×).  A value in the user's Dask
    config files or ``DASK_*`` environment wins, and one set off in this process stays off.
    """
    import dask

    key = "distributed.worker.profile.enabled"
    stated = _users_setting(key)
    if stated is not None:
        return stated
    return bool(dashboard_address) and bool(dask.config.get(key, default=True))


class HeartbeatWithoutTraceback(logging.Filter):
    """Takes the traceback off distributed's "Failed to communicate with scheduler during heartbeat" records.

    When a LocalCluster shuts down, a worker process that its nanny restarted a moment before (after the OOM
    killer, say) can still send a heartbeat to the scheduler that just closed; the worker logs the failure with
    the stream's traceback, in the middle of the user's terminal, once the run has ended well (seen in ~1 of 5
    runs of the killed-worker test).  The line stays, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Failed to communicate with scheduler during heartbeat"):
            record.exc_info = record.exc_text = None
        return True


def dask_setup(worker) -> None:
    """Run by each LocalCluster worker process of :func:`make_client` as it starts (Dask's ``preload``): the
    heartbeat log filter, the quick end of the closed worker's process (:func:`end_closed_worker_process`), the
    packages that task threads must not be the first to import (:func:`~diffim_dag.graph.import_shared_packages`:
    before the worker joins, so before its first task; a forked worker has them), and the task modules' import in
    the background (:func:`import_task_modules`)."""
    import atexit
    import threading

    from .graph import import_shared_packages

    import_shared_packages()
    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, HeartbeatWithoutTraceback) for f in logger.filters):
        logger.addFilter(HeartbeatWithoutTraceback())

    if all(getattr(p, "name", None) == __name__ for p in getattr(worker, "preloads", ())):
        atexit.register(end_closed_worker_process, worker)  # (not with a user's preloads: their exit handlers run)
    threading.Thread(target=import_task_modules, name="diffim-dag-imports", daemon=True).start()


def import_task_modules() -> None:
    """Import the modules a visit's tasks run (the stages, numerics, models and readers, and what they load),
    for a worker process that has just started: in the background, while the worker joins its scheduler and the
    client sends the graph, instead of in its first tasks (~1 s on one core, for each worker at once); a worker
    forked from :func:`start_worker_server` has them all already.

    Then the objects that exist (the modules', the worker's) leave the garbage collector's passes for good
    (``gc.freeze``, as :func:`~diffim_dag.memory.imported_out_of_collection` does for the command line): a full
    pass walked all ~150,000 of them, 0.09 s with the interpreter lock held, once in every 2-worker batch of 6
    visits of 2048², and in a forked worker it writes to every inherited object, copying its page."""
    import gc
    import importlib

    for name in task_module_names():
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the task that needs it will say why
            log.debug("background import of %s failed: %s", name, exc)
    gc.freeze()


def task_module_names() -> list[str]:
    """The modules a visit's tasks run: the visit's stages and products, and every module of the readers,
    numerics, PSF models and stages (found on disk; the packages are not imported here)."""
    import importlib.util
    import pkgutil

    names = ["diffim_dag.visit", "diffim_dag.visit_outputs", "diffim_dag.products"]
    for package in ("diffim_dag.io", "diffim_dag.kernels", "diffim_dag.psf", "diffim_dag.stages"):
        found = importlib.util.find_spec(package).submodule_search_locations
        names += [package, *(m.name for m in pkgutil.iter_modules(found, package + "."))]
    return names


def end_closed_worker_process(worker) -> None:
    """At the exit of a LocalCluster worker's process (:func:`dask_setup` registers it), once the worker closed as
    asked: end the process at once (``os._exit(0)``, the status it was exiting with) instead of the interpreter's
    teardown of its ~1800 modules and their objects.

    A cluster's close waits for its worker processes to end: the teardown took 0.3–0.4 s of every batch
    (``LocalCluster.close`` 0.33–0.43 s with it, 0.03 s without, 2 workers), a fixed cost in the wall time of the
    1-worker and the 2-worker batch alike.  By then the worker's results are delivered, its outputs installed, and
    multiprocessing has flushed the queues to its nanny (``Process._bootstrap`` does before the exit handlers run);
    registered after them, this handler runs before the library's exit handlers, which have nothing left to do for
    a closed worker.  A worker that did not close (it failed to start, or its process is ending on an error), or one
    that runs preloads of the user's Dask config (their exit handlers may matter), exits as usual."""
    from distributed.core import Status

    if getattr(worker, "status", None) != Status.closed:
        return
    logging.shutdown()
    _exit_now(0)


def dashboard_link(client) -> str:
    """The URL of the Dask dashboard of ``client``'s scheduler; "" where it serves none."""
    try:
        return client.dashboard_link or ""
    except Exception:  # noqa: BLE001 - a scheduler without a dashboard service (KeyError) or gone
        return ""


def scheduler_for(scheduler: str | None, cluster: ClusterConfig) -> str | None:
    """--scheduler, else the pipeline's cluster.scheduler, else DASK_SCHEDULER_ADDRESS (set by a DaskJob);
    None (a new LocalCluster) for none of them or ``"local"``."""
    found = scheduler or cluster.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    return None if found == LOCAL_CLUSTER else found


def kubernetes_cluster(spec: str, cluster: ClusterConfig):
    """A dask-kubernetes operator ``KubeCluster`` from ``kubernetes[://NAME][?key=value&...]``.

    Keys: ``image``, ``n_workers``, ``namespace``, ``resources_cpu``, ``resources_memory``.
    The pipeline says ``cluster: {scheduler: "kubernetes://diffim?n_workers=8&image=..."}``.
    """
    from urllib.parse import parse_qsl, urlsplit

    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise DiffimError("the pipeline asks for a Kubernetes cluster but dask-kubernetes is not installed "
                          "(pip install 'diffim_dag[k8s]')") from None
    parts = urlsplit(spec if "://" in spec else spec + "://")
    q = dict(parse_qsl(parts.query))
    kwargs: dict[str, Any] = {"name": parts.netloc or "diffim-dag",
                              "image": q.get("image", "ghcr.io/diffim-dag/diffim-dag:latest"),
                              "n_workers": int(q.get("n_workers", cluster.n_workers or 2)),
                              "env": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                      "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False"}}  # (work_stealing)
    if "namespace" in q:
        kwargs["namespace"] = q["namespace"]
    if "resources_cpu" in q or "resources_memory" in q:
        r = {k: v for k, v in (("cpu", q.get("resources_cpu")), ("memory", q.get("resources_memory"))) if v}
        kwargs["resources"] = {"requests": r, "limits": r}
    return KubeCluster(**kwargs)


def _bounded(function, seconds: float) -> None:
    """Call ``function()`` in a daemon thread and wait at most ``seconds`` for it."""
    import threading

    def quietly():
        try:
            function()
        except Exception as exc:  # noqa: BLE001 - the process is ending; say it in the log, not as a traceback
            log.debug("cleanup %r failed: %s", function, exc)

    thread = threading.Thread(target=quietly, daemon=True)
    thread.start()
    thread.join(seconds)


@contextlib.contextmanager
def open_client(scheduler: str | None = None, cluster: ClusterConfig | None = None, *, n_workers: int | None = None):
    """A distributed client, closed (and its cluster shut down) on exit.

    ``scheduler``: ``kubernetes[://NAME?…]`` (:func:`kubernetes_cluster`, deleted on exit or Ctrl-C), a
    scheduler's address, or None / ``"local"`` for a new LocalCluster (``n_workers``, else
    ``cluster.n_workers``, else one per core; ``cluster.threads_per_worker``, ``cluster.memory_limit``; a Dask
    dashboard only at ``cluster.dashboard``).
    A :class:`WorkerWatchdog` ends a run left without workers for ``cluster.no_worker_timeout`` s.
    """
    import warnings

    from distributed import Client

    # in-memory exposures travel to the workers inside a one-visit graph (tens of MB)
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    scheduler = None if scheduler == LOCAL_CLUSTER else scheduler
    cluster = cluster or ClusterConfig()
    closers: list = []
    try:
        if scheduler and scheduler.startswith("kubernetes"):
            from .io.outputs import register_cleanup, unregister_cleanup

            kube = kubernetes_cluster(scheduler, cluster)
            client = Client(kube)
            # on Ctrl-C/SIGTERM the CLI exits at once: delete the operator's DaskCluster first (bounded wait)
            handle = register_cleanup(lambda: _bounded(kube.close, 1.5))
            closers = [client.close, kube.close, lambda: unregister_cleanup(handle)]
        elif scheduler:
            client, _ = make_client(scheduler)
            closers = [client.close]
        else:
            client, local = make_client(None, n_workers=n_workers or cluster.n_workers,
                                        threads_per_worker=cluster.threads_per_worker,
                                        memory_limit=cluster.memory_limit, dashboard_address=cluster.dashboard)
            closers = [client.close, local.close]
        closers.insert(0, WorkerWatchdog(client, cluster.no_worker_timeout).start().stop)
        yield client
    finally:
        for close in closers:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - shutting down: say it in the log, not as a traceback
                log.debug("closing %r failed: %s", close, exc)


def as_completed(futures):
    """The futures in the order they finish (``distributed.as_completed``)."""
    from distributed import as_completed as _as_completed

    return _as_completed(futures)


def performance_report(filename: str):
    """Dask's performance report (needs bokeh); without bokeh, a task-stream table in plain HTML."""
    import contextlib

    try:
        import bokeh  # noqa: F401
    except ImportError:
        bokeh = None
    if bokeh is not None:
        from distributed import performance_report

        return performance_report(filename=filename)

    @contextlib.contextmanager
    def fallback():
        from distributed import get_client, get_task_stream

        client = get_client()
        with get_task_stream(client) as ts:
            yield
        _write_task_stream_html(filename, ts.data)

    return fallback()


def _write_task_stream_html(filename: str, data: list[dict]) -> None:
    import html

    from .io.atomic import atomic_write_text

    rows = []
    for t in sorted(data, key=lambda d: min((s["start"] for s in d.get("startstops", ())), default=0)):
        for s in t.get("startstops", ()):
            rows.append(f"<tr><td>{html.escape(str(t.get('key')))}</td><td>{html.escape(str(t.get('worker')))}</td>"
                        f"<td>{html.escape(s['action'])}</td><td>{s['stop'] - s['start']:.3f}</td></tr>")
    atomic_write_text(filename, (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>diffim-dag performance report</title></head><body>"
        "<h1>diffim-dag performance report</h1><p>Task stream (install bokeh for Dask's full performance report).</p>"
        "<table border='1'><tr><th>key</th><th>worker</th><th>action</th><th>seconds</th></tr>"
        + "".join(rows) + "</table></body></html>\n"))


def worker_name() -> str:
    """The Dask worker running this task (its address), else ``host:pid``."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


_exit_fork_server_at_once()  # (in the workers' fork server only: see there)

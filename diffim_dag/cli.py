"""``diffim-dag``: the command line.

Subcommands
-----------
simulate   write a simulated science/template pair and its truth table
subtract   subtract a template from a science exposure and write the output contract
demo       simulate a pair and run every built stage on a LocalCluster
info       say what a FITS/zarr file holds: planes, WCS, PSF, noise, saturation
run        run a pipeline over a manifest of (visit, detector) rows as one Dask batch

Common options: ``--pipeline FILE.yaml``, ``-c key=value`` (repeatable),
``--scheduler ADDRESS``, ``--out DIR``, ``-v``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from .errors import DiffimError

__all__ = ["main", "build_parser"]

log = logging.getLogger("diffim_dag")


def _common(p: argparse.ArgumentParser, *, out_default: str | None = None) -> None:
    p.add_argument("--pipeline", metavar="FILE.yaml", help="pipeline definition (see pipelines/)")
    p.add_argument("-c", "--config", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. -c kernel.spatial_kernel_order=2 (repeatable)")
    p.add_argument("--method", choices=("al", "al-preconvolve", "zogy"),
                   help="subtraction method (default: the pipeline's, else al)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="tcp://HOST:PORT of a running Dask scheduler, or 'local' for a new LocalCluster "
                        "(default: the pipeline's cluster.scheduler, else this process's threads)")
    p.add_argument("--out", metavar="DIR", default=out_default, required=out_default is None, help="output folder")
    _fakes_option(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def _fakes_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fakes", type=int, metavar="N",
                   help="inject N fake point sources into the science (fakes.n; more in the pipeline's fakes: "
                        "section) and measure their recovery: injection.parquet, completeness.csv, "
                        "plots/completeness.png, metrics.json 'injection'")


def _exposure_options(p: argparse.ArgumentParser, role: str) -> None:
    pre = f"{role}-" if role else ""
    who = f"{role} " if role else ""
    p.add_argument(f"--{pre}hdu", help=f"HDU of the {who}image in a multi-image file (e.g. SCIENCE)")
    p.add_argument(f"--{pre}psf", metavar="FILE", help=f"{who}PSF image (FITS)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(f"--{pre}variance", metavar="FILE", help=f"{who}variance map")
    g.add_argument(f"--{pre}noise", metavar="FILE", help=f"{who}1-sigma noise map")
    g.add_argument(f"--{pre}weight", metavar="FILE", help=f"{who}inverse-variance weight map")
    p.add_argument(f"--{pre}mask", metavar="FILE", help=f"{who}mask (bit planes with MP_* keys, or nonzero = BAD)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffim-dag", description="Image differencing as Dask graphs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write a simulated science/template pair and its truth table")
    _common(p)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (256 to 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="sim_overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="simulator field, e.g. --set n_transients=20 (repeatable)")
    p.add_argument("--layout", choices=("lsst", "plain"), default="lsst",
                   help="lsst: IMAGE/MASK/VARIANCE(/PSF) extensions; plain: the image only, as an archive serves it")
    p.add_argument("--no-psf", action="store_true", help="no PSF extension (lsst layout)")
    p.add_argument("--no-keywords", action="store_true",
                   help="no GAIN, RDNOISE, SATURATE or MAGZERO in the headers (an uncalibrated frame)")

    p = sub.add_parser("subtract", help="subtract TEMPLATE from SCIENCE and write the output contract")
    _common(p)
    p.add_argument("science", help="science exposure (LSST MEF, plain FITS or zarr)")
    p.add_argument("template", nargs="?", help="template exposure (warped onto the science grid when the grids differ)")
    _exposure_options(p, "science")
    _exposure_options(p, "template")
    p.add_argument("--template-store", metavar="DIR", help="folder of template patches (FITS/zarr) to fetch and warp")
    p.add_argument("--no-warp", action="store_true",
                   help="the two images share one pixel grid: never warp (a WCS disagreement is only warned about)")
    p.add_argument("--plots", action="store_true", help="also write plots/*.png")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (an earlier output set, or other files) as a whole")

    p = sub.add_parser("demo", help="simulate a pair and run every built stage (in this process, or on --scheduler)")
    _common(p, out_default="demo_out")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--plots", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace other files in --out (an earlier demo is replaced)")

    p = sub.add_parser("info", help="what a file holds: planes, WCS, PSF, noise, saturation")
    p.add_argument("path")
    _exposure_options(p, "")  # --hdu, --psf, --variance/--noise/--weight, --mask
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-v", "--verbose", action="count", default=0)

    p = sub.add_parser("run", help="run PIPELINE.yaml over a manifest of (visit, detector) rows as one Dask batch")
    p.add_argument("pipeline", metavar="PIPELINE.yaml", help="pipeline definition (see pipelines/)")
    p.add_argument("--manifest", required=True, metavar="FILE",
                   help="CSV with columns visit,detector,science,template (paths relative to the manifest)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (DIR/visit=V/detector=D/, run_report.json)")
    p.add_argument("-c", "--config", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="tcp://HOST:PORT of a running Dask scheduler, kubernetes://NAME?n_workers=N, or 'local' "
                        "(default: the pipeline's cluster.scheduler, $DASK_SCHEDULER_ADDRESS, else a LocalCluster)")
    p.add_argument("--method", choices=("al", "al-preconvolve", "zogy"),
                   help="subtraction method (default: the pipeline's)")
    p.add_argument("--workers", type=int, metavar="N", help="LocalCluster workers (default: cores)")
    p.add_argument("--retries", type=int, default=2, help="retries of a visit after a transient error (default 2)")
    p.add_argument("--report", metavar="FILE.html", help="write Dask's performance report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _fakes_option(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffim_dag").setLevel(level)
    # Dask's own chatter only with -vv
    for name in ("distributed", "dask"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    # third-party warnings (astropy's about a truncated file, a WCS keyword…) go to the log, shown with -v
    import astropy  # its logger is astropy's own class: let astropy create it first

    logging.captureWarnings(True)
    quiet = logging.WARNING if verbosity >= 1 else logging.ERROR
    logging.getLogger("py.warnings").setLevel(quiet)
    astropy.log.setLevel(quiet)


def _read_any(path: str, args, role: str):
    from .io import read_exposure, read_zarr

    def opt(name):
        return getattr(args, f"{role}_{name}" if role else name, None)

    if Path(path).is_dir():
        return read_zarr(path)
    return read_exposure(
        path,
        hdu=opt("hdu"),
        psf=opt("psf"),
        variance=opt("variance"),
        noise=opt("noise"),
        weight=opt("weight"),
        mask=opt("mask"),
    )


def _print_info(path: str, desc: dict) -> None:
    print(f"{path}")
    ny, nx = desc["shape"]
    print(f"  size      : {nx} x {ny} px, xy0 = {tuple(desc['xy0'])}")
    planes = desc["planes"]
    print(f"  planes    : image ({planes['image']['dtype']}), variance ({planes['variance']['dtype']}, "
          f"from {planes['variance']['source']}), mask ({planes['mask']['dtype']})")
    fr = planes["mask"]["fractions"]
    print("  mask      : " + (", ".join(f"{k} {100 * v:.2f}%" for k, v in fr.items()) if fr else "no pixel flagged"))
    n = desc["noise"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.4g}"

    print(f"  noise     : measured sky noise {fmt(n['measured_sky_noise'])} (between the sources), "
          f"median sqrt(variance) {fmt(n['median_sqrt_variance'])}")
    w = desc["wcs"]
    if w:
        print(f"  WCS       : {'/'.join(w['ctype'])}, centre RA {w['center_ra_dec'][0]:.6f} Dec {w['center_ra_dec'][1]:.6f}, "
              f"scale {w['pixel_scale_arcsec'][0]:.4f}\"/px")
    else:
        print("  WCS       : none")
    p = desc["psf"]
    print(f"  PSF       : {p['model']}, FWHM {p['fwhm_pixels']:.3f} px at centre" if p else "  PSF       : none")
    info = desc["info"]
    sat = desc.get("saturation")
    how = info.get("saturation_source") or ("header keyword" if sat is not None else None)
    print(f"  saturation: {sat if sat is not None else 'unknown'}" + (f" ({how})" if how else ""))
    print(f"  metadata  : band={info['band']} visit={info['visit']} detector={info['detector']} gain={info['gain']} "
          f"exptime={info['exposure_time']} date={info['date_obs']}")


def _overrides(args) -> list[str]:
    """``-c`` overrides, with ``--method`` as ``method=…`` and ``--fakes N`` as ``fakes.n=N`` (they win over the
    pipeline file)."""
    extra = [f"method={args.method}"] if getattr(args, "method", None) else []
    if getattr(args, "fakes", None) is not None:
        extra.append(f"fakes.n={args.fakes}")
    return list(args.overrides) + extra


def _cmd_info(args) -> int:
    exposure = _read_any(args.path, args, "")
    desc = exposure.describe()
    if args.json:
        print(json.dumps(desc, indent=2, default=str))
    else:
        _print_info(args.path, desc)
    return 0


def _cmd_simulate(args) -> int:
    from .sim import SimConfig, simulate_pair, write_pair
    from .config import apply_overrides, _build

    data = apply_overrides({"size": args.size, "seed": args.seed}, args.sim_overrides)
    sim_config = _build(SimConfig, data, "sim")
    pair = simulate_pair(sim_config)
    paths = write_pair(pair, args.out, layout=args.layout, psf=not args.no_psf, keywords=not args.no_keywords)
    for name, path in paths.items():
        print(f"wrote {name}: {path}")
    return 0


def _cmd_subtract(args) -> int:
    from .config import load_config
    from .errors import InputError
    from .io.outputs import check_output_dir
    from .pipeline import subtract_files

    config = load_config(args.pipeline, _overrides(args))
    if (args.template is None) == (args.template_store is None):
        raise InputError("give either a TEMPLATE file or --template-store DIR (exactly one)")
    out = check_output_dir(args.out, overwrite=args.overwrite)  # before any work

    def options(role):
        return {name: getattr(args, f"{role}_{name}", None)
                for name in ("hdu", "psf", "variance", "noise", "weight", "mask")}

    # each file is read by its own task of the visit's graph, both at once (and on the workers with --scheduler)
    try:
        lines = subtract_files(args.science, args.template, config=config, out_dir=out,
                               science_options=options("science"), template_options=options("template"),
                               template_store=args.template_store, warp=False if args.no_warp else None,
                               scheduler=args.scheduler, plots=args.plots)
    except DiffimError as exc:
        # a failure of the pair itself (too few kernel sources or stars) names neither file: the line says which
        pair = [str(args.science), str(args.template or args.template_store)]
        if not any(name in str(exc) for name in pair):
            raise DiffimError(f"{pair[0]} − {pair[1]}: {exc}") from None
        raise
    for line in lines:
        print(line)
    return 0


def _cmd_demo(args) -> int:
    from .io.outputs import check_output_dir
    from .pipeline import run_demo

    check_output_dir(args.out, overwrite=args.overwrite, replace_own=True)
    return run_demo(
        out_dir=args.out,
        size=args.size,
        seed=args.seed,
        pipeline=args.pipeline,
        overrides=_overrides(args),
        scheduler=args.scheduler,
        plots=args.plots,
    )


def _cmd_run(args) -> int:
    from .batch import run_batch
    from .config import load_config

    config = load_config(args.pipeline, _overrides(args))
    report = run_batch(args.manifest, config, args.out, scheduler=args.scheduler, n_workers=args.workers,
                       retries=args.retries, progress=not args.no_progress, report_html=args.report)
    print(report.table())
    print(report.summary())
    print(f"wrote {Path(report.out_dir) / 'run_report.json'}" + (f" and {args.report}" if args.report else ""))
    return 0 if report.ok else 1


def _stop(command: str, message: str, code: int) -> None:
    """End the command now: temporary outputs removed, Dask's worker processes killed, one line, ``code``."""
    import multiprocessing
    import shutil

    from .io.outputs import remove_temporaries

    for child in multiprocessing.active_children():  # a LocalCluster's workers (and their nannies' processes)
        with contextlib.suppress(Exception):
            child.kill()
    _unlink_semaphores()
    with contextlib.suppress(Exception):  # multiprocessing's temporary folder (the workers' fork server's socket),
        # which its finalizer removes at a normal exit
        tempdir = multiprocessing.current_process()._config.get("tempdir")
        if tempdir:
            shutil.rmtree(tempdir, ignore_errors=True)
    with contextlib.suppress(Exception):  # the spawn context's helper, which would report the workers' semaphores
        from multiprocessing import resource_tracker

        pid = resource_tracker._resource_tracker._pid
        if pid:
            os.kill(pid, 9)
    remove_temporaries()  # once no worker process can write into them any more
    try:
        sys.stderr.write(f"diffim-dag {command}: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def _unlink_semaphores() -> None:
    """Unlink the named semaphores this process made for its worker processes (a LocalCluster's nannies' queues
    and locks, in ``/dev/shm``): :func:`os._exit` skips the finalizers that unlink them at a normal exit, and the
    resource tracker that would unlink them instead is killed (it would print a warning as it did).  Without this,
    each interrupted ``diffim-dag run`` on two workers left 12 of them until the machine restarted."""
    import multiprocessing.util
    from multiprocessing.synchronize import SemLock

    for finalizer in list(multiprocessing.util._finalizer_registry.values()):
        if getattr(finalizer, "_callback", None) is SemLock._cleanup:
            with contextlib.suppress(Exception):
                finalizer()  # (sem_unlink, and the tracker told: it is still alive here)


def _install_stop_handlers(command: str) -> None:
    """Ctrl-C and SIGTERM end the command within a moment (exit 130 / 143), leaving no partial output; a
    cluster left without workers ends it with an error (exit 1) instead of a hang."""
    import signal

    from .cluster import set_stall_handler

    def on_signal(signum, frame):
        name = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated (SIGTERM)"
        _stop(command, f"{name}; no partial output left", 128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    set_stall_handler(lambda message: _stop(command, f"error: {message}", 1))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"info": _cmd_info, "simulate": _cmd_simulate, "subtract": _cmd_subtract, "demo": _cmd_demo,
                "run": _cmd_run}
    working = argv is None and args.command in ("subtract", "demo", "run")  # the command line, not an in-process call
    if working:
        from .memory import reuse_freed_memory, small_pages_for_arrays

        # before anything loads NumPy (the logging set-up does: astropy imports it)
        reuse_freed_memory()  # (before NumPy starts OpenBLAS's threads, and before any task thread starts)
        small_pages_for_arrays()  # (read when NumPy loads)
    _setup_logging(args.verbose)
    if working:
        import importlib

        from .memory import imported_out_of_collection

        _install_stop_handlers(args.command)
        if args.command == "run":
            _prepare_workers(args)
        with imported_out_of_collection():
            if args.command == "subtract" and not args.scheduler:
                _touch_ahead(args)  # (after the stop handlers: its header read is the first file the command opens)
            importlib.import_module(".batch" if args.command == "run" else ".pipeline", __package__)
    try:
        code = handlers[args.command](args)
    except DiffimError as exc:
        print(f"diffim-dag {args.command}: error: {_plain(str(exc))}", file=sys.stderr)
        code = 2
    if argv is None:  # the command line, not an in-process call
        _end_process(code)
    return code


def _prepare_workers(args) -> None:
    """``run`` on a new LocalCluster: the server its workers are forked from starts now
    (:func:`~diffim_dag.cluster.prepare_local_workers`), importing the task modules on the other core while this
    process loads its own; a pipeline that cannot be read is left for the command to report."""
    from .cluster import prepare_local_workers, scheduler_for
    from .config import load_config

    try:
        config = load_config(args.pipeline, _overrides(args))
    except Exception:  # noqa: BLE001 - the command reports it
        return
    if scheduler_for(args.scheduler, config.cluster) is None:
        prepare_local_workers()


def _touch_ahead(args) -> None:
    """The single subtraction runs on this process's threads: while the rest of its modules load (one core busy),
    have the memory its first stages will allocate touched on the other (:func:`~diffim_dag.memory.touch_heap_ahead`:
    :data:`~diffim_dag.memory.TOUCH_AHEAD_PLANES` planes of the science image, from its header)."""
    from .manifest import image_shape
    from .memory import TOUCH_AHEAD_PLANES, touch_heap_ahead

    shape = image_shape(args.science, args.science_hdu)
    if shape is not None:
        touch_heap_ahead(TOUCH_AHEAD_PLANES * 4 * shape[0] * shape[1])


def _end_process(code) -> None:
    """End the command line's process with ``code`` once its work is done: its outputs are written, checksummed
    and closed, so the interpreter's teardown of ~1800 modules and their objects (0.4 s of every command,
    a tenth of a 1024² subtraction) only frees memory the system takes back at once.  Not after a Dask
    cluster ran in this process: its clean-up runs at the interpreter's exit."""
    if "distributed" in sys.modules:
        return
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(int(code or 0))


def _plain(message: str) -> str:
    """A message as one line with plain numbers (``np.float32(1.5)`` → ``1.5``)."""
    import re

    message = re.sub(r"np\.(?:float|int|uint)\d*\(([^()]*)\)", r"\1", message)
    return " ".join(message.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What the command lines share: one-line errors, up-front path checks, progress bars.

``run_cli(main, argv, prog)`` runs a command's ``main``; a bad argument, a missing or broken
file (``ValueError``, ``TypeError``, ``OSError``, a safetensors error) prints one line
``prog: error: ...`` and exits 2, anything else one line and exit 1; ``--debug`` anywhere in
the arguments shows the traceback instead. No torch import here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence

DEBUG_HELP = "show the full traceback of an error instead of one line"


class Parser(argparse.ArgumentParser):
    """argparse, whose errors (an unknown flag, ``--max-new-tokens 2.5``) are one line too."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (--help lists the options)", file=sys.stderr)
        raise SystemExit(2)


def _usage_error(e: BaseException) -> bool:
    return isinstance(e, (ValueError, TypeError, OSError)) or type(e).__name__ == "SafetensorError"


def one_line(e: BaseException) -> str:
    """The exception's message on one line (its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None, prog: str) -> int:
    """``main(argv)``'s exit code, returned (argparse's exits too); errors as one line on
    stderr (2 for bad arguments and files, 1 for the rest) unless ``--debug`` is among the
    arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except SystemExit as e:  # argparse: --help (0) or its one-line error (2)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if "--debug" in argv:
            raise
        if _usage_error(e):
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"{prog}: error: {type(e).__name__}: {one_line(e)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def exit_process(code: int) -> None:
    """Leave with ``code``. A rank that torchrun started (``WORLD_SIZE`` > 1) flushes its
    streams and leaves at once (``os._exit``): its work is done and its process group destroyed,
    and the interpreter's teardown is where gloo's C++ destructors now and then abort a finished
    run ("terminate called without an active exception", SIGABRT, no Python frame; seen about
    once in 30 runs on 2 busy cores), which torchrun would report as a failure."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


def check_dir(flag: str, path: str | os.PathLike, must_hold: str | None = None) -> str:
    """``path`` if it is a directory (holding ``must_hold`` when given), else an error naming
    the flag and the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such directory")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path}: not a directory")
    if must_hold is not None and not os.path.isfile(os.path.join(path, must_hold)):
        raise FileNotFoundError(f"{flag} {path}: no {must_hold} in it (an HF model directory "
                                "is expected)")
    return path


def check_file(flag: str, path: str | os.PathLike) -> str:
    """``path`` if it is a file, else an error naming the flag and the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "a directory, not a file" if os.path.isdir(path) else "no such file"
        raise FileNotFoundError(f"{flag} {path}: {what}")
    return path


def check_device(flag: str, device: str | None) -> str:
    """A torch device string that exists here (default: cuda when available, else cpu)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {device!r}: not a device (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: no CUDA device is available here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: there are {torch.cuda.device_count()} CUDA "
                             "device(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"{flag} {device!r}: only cpu and cuda devices are supported")
    return device


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True):
    """A tqdm bar on stderr (rate and ETA), or the bare iterable when not ``enabled``."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


THREADS_HELP = ("torch CPU threads: N, or auto (the default): the cores the 1-minute load "
                "average leaves idle, at least 1 and at most torch's default; when "
                "OMP_NUM_THREADS is set, torch's own choice (which follows it) is kept")


def threads_flag(value: str) -> int | str:
    """argparse ``type=`` of ``--threads``: 'auto' or an int >= 1."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be auto or a thread count >= 1, got {value!r}")
    return n


def auto_threads() -> int:
    """The idle cores: ``cores - load average`` (1 minute, rounded), clamped to
    [1, torch.get_num_threads()]. On a busy CPU torch's default (one thread per core) makes its
    OpenMP threads wait on one another: decoding the demo with 2 threads on 2 loaded cores ran
    12-30x slower than with 1 (bench/results/2026-12-07-cpu-threads.md)."""
    import torch

    n = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return n
    return max(1, min(n, int(cores - load + 0.5)))


class cpu_threads:
    """``with cpu_threads(args.threads):`` what a command runs, with torch's intra-op threads set
    (``threads``: an int, or "auto": ``auto_threads()`` unless ``OMP_NUM_THREADS`` is set) and
    the previous count restored on leaving (a command called in-process leaves its caller as it
    was). ``.threads`` is the count it ran with."""

    def __init__(self, threads: int | str):
        self.requested = threads

    def __enter__(self) -> cpu_threads:
        import torch

        self.previous = torch.get_num_threads()
        if self.requested == "auto":
            n = self.previous if os.environ.get("OMP_NUM_THREADS") else auto_threads()
        else:
            n = int(self.requested)
        torch.set_num_threads(n)
        self.threads = n
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.set_num_threads(self.previous)

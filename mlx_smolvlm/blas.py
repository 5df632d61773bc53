"""A fast system BLAS for MLX's CPU backend on Linux.

MLX's Linux CPU wheel links the *reference* BLAS and LAPACK (`mlx_cpu.libs/libblas-*.so`):
float32 matmuls run at a few GFLOP/s. `libmlx.so` leaves `cblas_sgemm` and its LAPACK calls
undefined, and Python loads extensions with RTLD_NOW, so they bind once, when `mlx.core` is
first imported, to the first definition in the process's global scope. A BLAS loaded with
RTLD_GLOBAL before that import is found first and wins, and the bundled one goes unused.

`MLX_SMOLVLM_BLAS`: unset, empty, `1`/`on`/`true` search the paths below; `0`/`off`/`false`
keep MLX's own; anything else is the path of a BLAS to load, and a `SettingError` (one line) if
it is not one, rather than a silent fallback.
`MLX_SMOLVLM_BLAS_THREADS`: OpenBLAS threads (default: the available cores, but one fewer when
the load average at import is at least half of them).
"""

import ctypes
import os
import sys
import warnings

from .errors import SmolVLMError

ENV, THREADS_ENV = "MLX_SMOLVLM_BLAS", "MLX_SMOLVLM_BLAS_THREADS"
ON, OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")
ACCEPTS = f"{ENV} accepts 1/on/true (the system OpenBLAS), 0/off/false (MLX's bundled BLAS) or a BLAS library's path"


class SettingError(SmolVLMError):
    """MLX_SMOLVLM_BLAS names no loadable BLAS, or MLX_SMOLVLM_BLAS_THREADS is no number."""

# libopenblas.so.0 defines every BLAS and LAPACK symbol libmlx.so imports; Debian's
# openblas-pthread/libblas.so.3 lacks the LAPACK ones. The pthread build: the OpenMP one would
# bring a second OpenMP runtime next to torch's.
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",  # Fedora
    "/usr/lib/libopenblas.so.0",  # Arch
]

# What preload() did: the library in use (None: MLX's own) and why.
state = {"library": None, "reason": "not on Linux", "threads": None, "core": None}


def _threads() -> int:
    # Every core on an idle machine, one fewer on a busy one: OpenBLAS's threads spin while
    # waiting, and on a 2-core machine (bench/bench_peers.py --quick, float32) 2 threads beat 1
    # when quiet (vision 3.67 vs 4.32 s, decode 16.2 vs 10.3 tok/s) but lost by far at load
    # average 11 (vision 43.4 vs 6.1 s, prefill 6.2 vs 0.56 s, decode 7.1 vs 9.5 tok/s).
    n = os.environ.get(THREADS_ENV, "").strip()
    if n:
        try:
            return int(n)
        except ValueError:
            raise SettingError(f"{THREADS_ENV}={n!r}: not a number of threads") from None
    cores = len(os.sched_getaffinity(0))
    busy = os.getloadavg()[0] >= cores / 2
    return max(1, cores - 1) if busy else cores


def preload():
    """Load the BLAS into the global scope; a no-op unless on Linux and before `mlx.core`."""
    choice = os.environ.get(ENV, "").strip()
    if not sys.platform.startswith("linux"):
        return
    if choice.lower() in OFF:
        state["reason"] = f"{ENV}={choice}"
        return
    if choice.lower() in ON:
        choice = ""
    if "mlx.core" in sys.modules:
        state["reason"] = "mlx.core was imported before mlx_smolvlm"
        if os.path.exists(choice or CANDIDATES[0]):
            warnings.warn(
                f"mlx.core was imported before mlx_smolvlm, so MLX keeps its bundled reference "
                f"BLAS (float32 on CPU ~20x slower). Import mlx_smolvlm first, or set {ENV}=0.",
                stacklevel=3,
            )
        return
    paths = [choice] if choice else [p for p in CANDIDATES if os.path.exists(p)]
    if not paths:
        state["reason"] = "no system OpenBLAS found (apt-get install libopenblas0-pthread)"
        return
    try:
        lib = ctypes.CDLL(paths[0], mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise SettingError(f"{ENV}={choice!r}: cannot load it ({e}); {ACCEPTS}") from None
    if not hasattr(lib, "cblas_sgemm"):
        raise SettingError(f"{ENV}={choice!r}: {paths[0]} has no cblas_sgemm, so it is not a BLAS; {ACCEPTS}")
    # OpenBLAS spins its threads between calls; more threads than cores only steal time.
    if hasattr(lib, "openblas_set_num_threads"):
        state["threads"] = _threads()
        lib.openblas_set_num_threads(state["threads"])
    if hasattr(lib, "openblas_get_corename"):  # the kernels its runtime dispatch picked for this CPU
        lib.openblas_get_corename.restype = ctypes.c_char_p
        state["core"] = lib.openblas_get_corename().decode()
    state.update(library=paths[0], reason=f"loaded {paths[0]}")


def describe() -> str:
    """One line for --verbose: which BLAS MLX's CPU backend uses."""
    if state["library"] is None:
        return f"BLAS: MLX's bundled reference BLAS ({state['reason']})"
    return f"BLAS: {state['library']} ({state['core']} kernels, {state['threads']} threads)"


def started_as_cli() -> bool:
    """Whether this process is one of our command lines, which import the package (and so run
    `preload`) before their `main` can catch anything: `python -m mlx_smolvlm.X` (argv[0] is
    "-m" while runpy imports the parent package) or an `mlx-smolvlm*` console script."""
    arg0 = sys.argv[0] if sys.argv else ""
    return arg0 == "-m" or os.path.basename(arg0).startswith("mlx-smolvlm")

"""The system BLAS under MLX's CPU backend (mlx_smolvlm/blas.py): where libmlx.so's BLAS and
LAPACK calls are bound, and that results are the same with and without it. The 'without'
runs in a subprocess: the binding happens once per process, when mlx.core is imported."""

import ctypes
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_smolvlm import blas

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-idefics3"
needs_openblas = pytest.mark.skipif(blas.state["library"] is None, reason=blas.state["reason"])


def bound_library(symbol: str) -> str:
    """The file that libmlx.so's GOT entry for `symbol` points into, read from this process."""
    lib = next(l.split()[-1] for l in open("/proc/self/maps") if l.rstrip().endswith("/libmlx.so"))
    data = Path(lib).read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shnum, = struct.unpack_from("<H", data, 0x3C)
    # (type, offset, size, link) of each section header
    sections = [struct.unpack_from("<4xI16xQQI", data, shoff + 64 * i) for i in range(shnum)]
    dynsym = next(s for s in sections if s[0] == 11)  # SHT_DYNSYM
    strtab = sections[dynsym[3]][1]

    def name(i):
        at = strtab + struct.unpack_from("<I", data, dynsym[1] + 24 * i)[0]
        return data[at : data.index(b"\0", at)].decode()

    got = next(
        off
        for kind, start, size, _ in sections
        if kind == 4  # SHT_RELA: r_offset, r_info (symbol index in the high half), r_addend
        for off, info, _ in struct.iter_unpack("<QQq", data[start : start + size])
        if info >> 32 and name(info >> 32) == symbol
    )
    base = min(int(l.split("-")[0], 16) for l in open("/proc/self/maps") if l.rstrip().endswith(lib))
    target = ctypes.c_void_p.from_address(base + got).value

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    info = DlInfo()
    assert ctypes.CDLL(None).dladdr(ctypes.c_void_p(target), ctypes.byref(info))
    return os.path.realpath(info.fname.decode())


def outputs() -> dict:
    """Logits of the tiny checkpoint on its golden inputs, and a few LAPACK results."""
    from mlx_smolvlm.loading import load_model

    golden = np.load(FIXTURE / "golden.npz")
    model = load_model(FIXTURE, dtype=mx.float32)
    logits = model(mx.array(golden["input.input_ids"]), pixel_values=mx.array(golden["input.pixel_values"]),
                   pixel_attention_mask=mx.array(golden["input.pixel_attention_mask"]))
    a = mx.array(np.random.default_rng(0).standard_normal((48, 48)).astype(np.float32))
    spd = a @ a.T + 48 * mx.eye(48)
    with mx.stream(mx.cpu):  # MLX's linalg runs on the CPU only
        lapack = {"inv": mx.linalg.inv(a), "cholesky": mx.linalg.cholesky(spd),
                  "eigvalsh": mx.linalg.eigvalsh(spd), "svd_s": mx.linalg.svd(a, compute_uv=False)}
    return {"logits": logits, **lapack}


def in_subprocess(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=Path(__file__).parent, check=True)


@needs_openblas
def test_mlx_calls_the_system_blas():
    # conftest.py imports mlx_smolvlm before any test module imports mlx.core.
    for symbol in ("cblas_sgemm", "sgetrf_", "ssyevd_"):
        assert bound_library(symbol) == os.path.realpath(blas.state["library"]), symbol


@needs_openblas
def test_same_results_without_it(tmp_path):
    ours = {k: np.array(v) for k, v in outputs().items()}
    in_subprocess(
        "import numpy as np, mlx_smolvlm, test_blas as t\n"
        "assert mlx_smolvlm.blas.state['library'] is None\n"
        "assert 'mlx_cpu.libs/libblas' in t.bound_library('cblas_sgemm')\n"
        f"np.savez({str(tmp_path / 'ref.npz')!r}, **{{k: np.array(v) for k, v in t.outputs().items()}})",
        MLX_SMOLVLM_BLAS="0",
    )
    ref = np.load(tmp_path / "ref.npz")
    for k, v in ours.items():
        scale = max(1.0, float(np.abs(ref[k]).max()))
        assert np.abs(v - ref[k]).max() / scale < 1e-5, k  # float32 summation order only


@needs_openblas
def test_explicit_library_and_threads():
    out = in_subprocess(
        "import mlx_smolvlm, test_blas as t\nprint(t.bound_library('cblas_sgemm'), mlx_smolvlm.blas.describe())",
        MLX_SMOLVLM_BLAS=blas.state["library"], MLX_SMOLVLM_BLAS_THREADS="1",
    ).stdout
    assert out.split()[0] == os.path.realpath(blas.state["library"]) and "1 threads)" in out


def test_default_threads_follow_the_load(monkeypatch):
    monkeypatch.delenv(blas.THREADS_ENV, raising=False)
    monkeypatch.setattr(blas.os, "sched_getaffinity", lambda pid: {0, 1})
    for load, threads in ((0.3, 2), (0.99, 2), (1.0, 1), (11.0, 1)):
        monkeypatch.setattr(blas.os, "getloadavg", lambda: (load, load, load))
        assert blas._threads() == threads, load
    monkeypatch.setattr(blas.os, "sched_getaffinity", lambda pid: {0})
    assert blas._threads() == 1


@pytest.mark.parametrize("value", ["/nonexistent/libblas.so", "bogus", "2", "libc.so.6"])
def test_a_value_that_is_no_blas_is_one_line(value):
    # A library import raises the typed error; the command line prints its one line and exits 1.
    with pytest.raises(subprocess.CalledProcessError) as e:
        in_subprocess("import mlx_smolvlm", MLX_SMOLVLM_BLAS=value)
    assert "mlx_smolvlm.blas.SettingError: MLX_SMOLVLM_BLAS=" in e.value.stderr
    r = subprocess.run([sys.executable, "-m", "mlx_smolvlm.generate", "--model", "x.gguf", "--prompt", "hi"],
                       capture_output=True, text=True, env={**os.environ, "MLX_SMOLVLM_BLAS": value})
    print(r.stderr)
    assert r.returncode == 1 and r.stderr.startswith(f"error: MLX_SMOLVLM_BLAS={value!r}: ")
    assert "accepts 1/on/true" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@needs_openblas
@pytest.mark.parametrize("value, library", [("1", True), ("on", True), ("TRUE", True), ("off", False), ("false", False)])
def test_on_and_off_words(value, library):
    out = in_subprocess("import mlx_smolvlm; print(mlx_smolvlm.blas.state['library'])", MLX_SMOLVLM_BLAS=value)
    assert out.stdout.strip() == (blas.state["library"] if library else "None")


@needs_openblas
def test_warns_when_mlx_came_first():
    out = in_subprocess("import mlx.core, mlx_smolvlm; print(mlx_smolvlm.blas.describe())")
    assert "imported before mlx_smolvlm" in out.stderr and "reference BLAS" in out.stdout

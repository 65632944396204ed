"""The environment Triton's Python-backend stub needs (PyTriton's server and exported repositories).

Triton runs every Python-backend model (PyTriton's proxy model too) in a `triton_python_backend_stub`
process that embeds `libpython3.X.so` and imports its packages from the first `python3` on PATH.
Two things go wrong on a machine like ours, both silently:

- The stub shipped with nvidia-pytriton 0.7 is compiled against numpy 1: under numpy 2 every tensor
  it returns arrives empty (shape [1, 3], zero bytes). nvidia-pytriton pins numpy<2, so a fresh
  `pip install 'novic[triton]'` is fine; an environment that keeps numpy 2 points the stub at a small
  venv with numpy 1 (scripts/triton-stub-venv.sh) through `stub_env=` or NOVIC_TRITON_STUB_ENV.
- The dynamic loader may find a different build of libpython3.X (e.g. the distribution's 3.11.2)
  than the interpreter whose standard library the stub then imports (e.g. pyenv's 3.11.7), which
  fails in `multiprocessing`. The interpreter's own LIBDIR goes first on LD_LIBRARY_PATH.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from novic.errors import NovicError

STUB_ENV_VAR = "NOVIC_TRITON_STUB_ENV"
STUB_VENV_FIX = "bash scripts/triton-stub-venv.sh .triton-stub-venv"


class TritonSetupError(NovicError):
    """Triton cannot be started in this environment; the message is one line with the fix."""


def require_pytriton():
    try:
        import pytriton.triton  # noqa: F401
    except ImportError:
        raise TritonSetupError("Triton serving needs PyTriton: pip install 'novic[triton]'") from None


def numpy_major() -> int:
    import numpy

    return int(numpy.__version__.split(".")[0])


def stub_env_for(stub_env: str | os.PathLike | None = None) -> Path | None:
    """The Python environment the stub should run in: `stub_env`, else $NOVIC_TRITON_STUB_ENV, else
    None (this environment, fine when its numpy is 1.x). Checked: Python minor version and numpy 1."""
    chosen = stub_env or os.environ.get(STUB_ENV_VAR) or None
    if chosen is None:
        if numpy_major() >= 2:
            raise TritonSetupError(
                f"this environment has numpy 2, but Triton's Python-backend stub needs numpy 1 (its "
                f"outputs come back empty otherwise); create a stub venv with `{STUB_VENV_FIX}` and pass "
                f"stub_env=.triton-stub-venv or set {STUB_ENV_VAR}")
        return None
    env = Path(chosen)
    python = env / "bin" / "python3"
    if not python.exists():
        raise TritonSetupError(f"{env}: no bin/python3 in this stub environment; create it with `{STUB_VENV_FIX}`")
    probe = ("import sys, numpy, zmq; print(f'{sys.version_info[0]}.{sys.version_info[1]}', "
             "numpy.__version__.split('.')[0])")
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60, check=True)
        version, numpy_v = out.stdout.split()
    except (subprocess.SubprocessError, OSError, ValueError):
        raise TritonSetupError(f"{env}: this stub environment cannot import numpy and zmq; recreate it with "
                               f"`{STUB_VENV_FIX}`") from None
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if version != here:
        raise TritonSetupError(f"{env}: stub environment has Python {version}, this one {here} (the stub is "
                               f"built per Python version); recreate it with this python: `{STUB_VENV_FIX}`")
    if numpy_v != "1":
        raise TritonSetupError(f"{env}: stub environment has numpy {numpy_v}.x, the stub needs numpy 1; "
                               f"recreate it with `{STUB_VENV_FIX}`")
    return env


def check_port_free(host: str, port: int, what: str) -> None:
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a listener fails it, TIME_WAIT does not
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise TritonSetupError(f"{what} port {port} on {host} is not free ({exc.strerror}); choose another "
                                   f"port or stop what listens there") from None


def libpython_dir() -> str | None:
    """This interpreter's libpython directory, when it has its own shared libpython."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        return libdir
    return None


def stub_environ(stub_env: Path | None, base: dict | None = None) -> dict:
    """Environment variables for a tritonserver process whose Python models run in `stub_env`
    (None: this environment)."""
    env = dict(os.environ if base is None else base)
    first = [p for p in (libpython_dir(),) if p]
    if first:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(first + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    python_bin = (stub_env or Path(sys.exec_prefix)) / "bin"
    env["PATH"] = os.pathsep.join([str(python_bin), env.get("PATH", "")])
    return env


@contextlib.contextmanager
def pytriton_stub_environment(stub_env: Path | None):
    """While PyTriton starts its server: the libpython fix in os.environ (the server inherits it) and
    PyTriton's choice of the stub's Python environment (its own is sys.exec_prefix) set to `stub_env`."""
    from pytriton.server import triton_server

    saved_env = dict(os.environ)
    saved_getter = triton_server.get_triton_python_backend_python_env
    os.environ.update({k: v for k, v in stub_environ(None).items() if k == "LD_LIBRARY_PATH"})
    if stub_env is not None:
        triton_server.get_triton_python_backend_python_env = lambda: stub_env
    try:
        yield
    finally:
        triton_server.get_triton_python_backend_python_env = saved_getter
        os.environ.clear()
        os.environ.update(saved_env)


def bundled_tritonserver(repository, workdir, *, stub_env: Path | None, host: str = "127.0.0.1",
                         http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                         extra_args: tuple = (), log=None):
    """Start the `tritonserver` binary from the nvidia-pytriton wheel on `repository` (a Popen).

    The wheel ships only the Python backend (no onnxruntime backend): `workdir` gets a backend
    directory with it and the stub for this Python version, as PyTriton arranges it for itself."""
    require_pytriton()
    import shutil

    from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

    server_dir = get_root_module_path() / "tritonserver"
    backends = Path(workdir) / "backends"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for item in (server_dir / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy(item, python_backend / item.name)
    shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                python_backend / "triton_python_backend_stub")
    env = stub_environ(stub_env)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([env.get("LD_LIBRARY_PATH", ""), str(get_libs_path())]).strip(os.pathsep)
    cmd = [str(server_dir / "bin" / "tritonserver"), f"--model-repository={repository}",
           f"--backend-directory={backends}", f"--http-address={host}", f"--http-port={http_port}",
           f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--metrics-address={host}",
           f"--metrics-port={metrics_port}", "--exit-timeout-secs=5", *extra_args]
    return subprocess.Popen(cmd, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)

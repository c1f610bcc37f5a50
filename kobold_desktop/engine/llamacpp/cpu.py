"""Which CPU build of llama.cpp runs on this machine.

`make` builds llama.cpp the way llama.cpp's own releases are built: the CPU code once per
x86-64 level (x64, sse42, sandybridge, haswell, skylakex, icelake, zen4, ...), each a
loadable library `libggml-cpu-<variant>.so` (GGML_BACKEND_DL, GGML_CPU_ALL_VARIANTS). Each
library scores the CPU it finds itself on (0: it cannot run here); we load the best one, so
one build, and the bundle made from it, runs on every x86-64 CPU without an illegal
instruction, and is as fast as a native build on the CPU it meets.

We choose instead of letting llama.cpp choose (`ggml_backend_load_all`) for one reason:
on CPUs with AMX (Sapphire Rapids and later Xeons) the best-scoring variant puts quantized
weights into llama.cpp's AMX buffer type, whose matrix product crashes the process
(llama.cpp issue #20824, closed without a fix). We pass over the AMX variants and take the
best of the rest (icelake or zen4 on those CPUs: AVX-512 with VNNI, and the CPU repacks of
q4_0/q4_K/iq4_nl weights, which are safe). A llama.cpp built with its CPU code linked in
(a plain `pip install llama-cpp-python`, native) may carry AMX too: there the extra buffer
types are turned off (`use_extra_bufts = False`) when AMX is among them.

`KOBOLD_LLAMA_CPU=<variant>` forces one (to compare them, or to work around a bad one);
`KOBOLD_LLAMA_EXTRA_BUFFERS=0` turns the extra buffer types (the CPU repacks) off.
"""

from __future__ import annotations

import _ctypes
import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kobold_desktop.engine.errors import ModelError

ENV = "KOBOLD_LLAMA_CPU"
EXTRA_BUFFERS_ENV = "KOBOLD_LLAMA_EXTRA_BUFFERS"
# Variants whose CPU code includes AMX tiles (llama.cpp's GGML_CPU_ALL_VARIANTS list).
AMX_VARIANTS = frozenset({"sapphirerapids"})
BUILT_IN = "built-in"


@dataclass(frozen=True)
class CpuBackend:
    """The CPU code llama.cpp runs with here."""

    variant: str  # "icelake", "haswell", ... or "built-in" (one CPU backend linked in)
    path: Path | None  # the variant's library
    supported: tuple[str, ...] = ()  # every variant this CPU can run, best first
    passed_over: tuple[str, ...] = ()  # variants that scored higher but were not taken (AMX)
    extra_buffer_types: tuple[str, ...] = ()  # e.g. ("CPU_REPACK",); never "AMX" when used
    extra_buffers_off: bool = False  # extra buffer types turned off (a built-in AMX build)

    def describe(self) -> str:
        """One line for --self-test, `generate --json` and the server's start-up line."""
        line = f"llama.cpp CPU variant {self.variant}"
        if self.passed_over:
            line += f" (passed over {', '.join(self.passed_over)}: AMX crashes llama.cpp)"
        if self.extra_buffers_off:
            line += " (AMX and the CPU repacks off: this llama.cpp build carries AMX)"
        return line


def _libraries(dirs: list[Path], stem: str) -> dict[str, Path]:
    """{name: library} for ggml's loadable libraries `[lib]<stem>NAME.so|.dll` in `dirs`
    (the first folder that has a name wins; copies like `.so.0` are not loadable backends)."""
    prefix, suffix = (stem, ".dll") if sys.platform == "win32" else ("lib" + stem, ".so")
    found: dict[str, Path] = {}
    for folder in dirs:
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.name.startswith(prefix) and path.name.endswith(suffix):
                    found.setdefault(path.name[len(prefix):-len(suffix)], path)
    return found


def library_dirs(lib: Any) -> list[Path]:
    """Where a llama-cpp-python install keeps llama.cpp's libraries: its `lib/` folder, and
    the `bin/` folder beside the package where ggml installs loadable backends."""
    base = Path(getattr(lib, "_base_path", Path(lib.__file__).parent / "lib"))
    return [base, base.parent.parent / "bin"]


def variant_files(dirs: list[Path]) -> dict[str, Path]:
    """{variant: library} for every CPU variant library in `dirs`."""
    return _libraries(dirs, "ggml-cpu-")


def backend_files(dirs: list[Path]) -> list[Path]:
    """Loadable non-CPU backends (CUDA, Vulkan, Metal, BLAS, ...) in a GGML_BACKEND_DL build."""
    return [path for name, path in _libraries(dirs, "ggml-").items() if name != "base" and not name.startswith("cpu")]


def score(path: Path) -> int:
    """The variant's own verdict on this CPU (ggml_backend_score: 0 = cannot run here;
    higher = uses more of it). The library is opened only to ask, then closed."""
    handle = ctypes.CDLL(str(path))
    try:
        fn = getattr(handle, "ggml_backend_score", None)
        if fn is None:
            return 0
        fn.restype, fn.argtypes = ctypes.c_int, []
        return int(fn())
    finally:
        if sys.platform != "win32":
            _ctypes.dlclose(handle._handle)


def choose(scores: dict[str, int], forced: str | None = None) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(variant, supported best first, passed over): the best-scoring variant this CPU can
    run that is not an AMX one, or the forced one."""
    supported = tuple(sorted((v for v, s in scores.items() if s > 0), key=lambda v: -scores[v]))
    if forced:
        if forced not in scores:
            raise ModelError(f"{ENV}={forced}: this llama.cpp build has no such CPU variant "
                             f"(it has {', '.join(sorted(scores)) or 'none'}).")
        if forced not in supported:
            raise ModelError(f"{ENV}={forced}: this CPU cannot run that variant (it can run "
                             f"{', '.join(supported) or 'none'}).")
        return forced, supported, ()
    safe = [v for v in supported if v not in AMX_VARIANTS]
    if not safe:
        raise ModelError("this CPU can run none of llama.cpp's CPU variants in this build "
                         f"(it has {', '.join(sorted(scores)) or 'none'}); reinstall the [gguf] extra.")
    passed = tuple(v for v in supported[: supported.index(safe[0])])
    return safe[0], supported, passed


def _loaded_ggml() -> str | None:
    """The libggml that libllama loaded (Linux). A wheel stores libggml.so, .so.0 and
    .so.0.x as three copies, and a backend registered with another copy than libllama's
    is one libllama never sees."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith("libggml.so"):
            return path.strip()
    return None


def _ggml(lib: Any) -> ctypes.CDLL:
    name = "ggml.dll" if sys.platform == "win32" else ("libggml.dylib" if sys.platform == "darwin" else "libggml.so")
    loaded = _loaded_ggml()
    if loaded:
        ggml = ctypes.CDLL(loaded)
    else:
        for folder in library_dirs(lib):
            if (folder / name).exists():
                ggml = ctypes.CDLL(str(folder / name))
                break
        else:
            ggml = ctypes.CDLL(None)  # linked into the process with libllama
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    return ggml


def load(lib: Any) -> CpuBackend:
    """Load llama.cpp's backends for this machine (once, before llama_backend_init)."""
    ggml = _ggml(lib)
    if int(ggml.ggml_backend_reg_count()) > 0:  # CPU code linked in: nothing to choose
        bufts = extra_buffer_types(ggml)
        return CpuBackend(BUILT_IN, None, extra_buffer_types=bufts, extra_buffers_off="AMX" in bufts)
    dirs = library_dirs(lib)
    files = variant_files(dirs)
    if not files:
        raise ModelError("llama.cpp was built with loadable backends but none is installed beside it "
                         f"(looked in {', '.join(map(str, dirs))}); reinstall the [gguf] extra.")
    forced = os.environ.get(ENV, "").strip() or None
    variant, supported, passed = choose({v: score(p) for v, p in files.items()}, forced)
    if not ggml.ggml_backend_load(str(files[variant]).encode()):
        raise ModelError(f"llama.cpp's CPU variant '{variant}' ({files[variant]}) failed to load.")
    for path in backend_files(dirs):  # GPU backends of a CUDA/Vulkan/Metal build
        ggml.ggml_backend_load(str(path).encode())
    bufts = extra_buffer_types(ggml)
    return CpuBackend(variant, files[variant], supported, passed, bufts,
                      extra_buffers_off="AMX" in bufts)


def extra_buffer_types(ggml: ctypes.CDLL) -> tuple[str, ...]:
    """Names of the CPU device's extra buffer types ("CPU_REPACK", "AMX", ...), where
    llama.cpp puts weights it lays out for a faster matrix product."""
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_buft_name.restype = ctypes.c_char_p
    ggml.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    device = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not device:
        return ()
    reg = ggml.ggml_backend_dev_backend_reg(device)
    address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return ()
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    array = get(device)
    names = []
    for i in range(64):
        if not array or not array[i]:
            break
        names.append(ggml.ggml_backend_buft_name(array[i]).decode(errors="replace"))
    return tuple(names)

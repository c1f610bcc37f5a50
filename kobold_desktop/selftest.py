"""`kobold-desktop --self-test`: prove that this installation (or bundle) works, headless.

Loads the demo model, lists the bundled soft prompts and loads one, generates with and
without it and with a mixture of them, reads soft prompt zips compressed with Deflate64 and with LZMA, and starts
the window's code offscreen. Where the demo model's GGUF is at hand (the bundle ships it),
llama.cpp generates from it with a soft prompt too, in a child process: a crash in native
code (an illegal instruction on an older CPU, a segfault) is then a failed check with its
name, never a silent exit. Prints each check, with the device, precision and llama.cpp CPU
variant chosen; exits 0 only if all passed. In the PyInstaller bundle this catches a
missing hidden import before a user does.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import torch

from kobold_desktop import paths


def _deflate64_zip(path: Path, payload: bytes) -> None:
    """A zip whose tensor.npy uses ZIP method 9 (Deflate64), as Windows and 7-Zip write it.

    A raw deflate stream without length-258 matches decodes identically as Deflate64;
    random floats never repeat that long, so zlib's stream is a valid Deflate64 stream.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressed = compressor.compress(payload) + compressor.flush()
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("tensor.npy")
        zf.writestr(info, compressed)
    data = bytearray(path.read_bytes())
    crc = zlib.crc32(payload)
    for signature, method_at, sizes_at in ((b"PK\x03\x04", 8, 14), (b"PK\x01\x02", 10, 16)):
        at = data.find(signature)
        struct.pack_into("<H", data, at + method_at, 9)
        struct.pack_into("<III", data, at + sizes_at, crc, len(compressed), len(payload))
    path.write_bytes(bytes(data))


def run_self_test(out=print) -> int:
    from kobold_desktop.engine import Engine, SamplingSettings
    from kobold_desktop.softprompt import Metadata, kobold_zip, load_softprompt, npy
    from kobold_desktop.softprompt.library import SoftPromptLibrary

    results: list[tuple[str, bool]] = []
    state: dict = {}

    def check(name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            detail = fn()
            ok = True
        except Exception as exc:  # noqa: BLE001 - a self-test reports every failure
            detail = f"{type(exc).__name__}: {exc}"
            if os.environ.get("KOBOLD_DESKTOP_DEBUG"):
                traceback.print_exc()
            ok = False
        results.append((name, ok))
        out(f"[{'ok' if ok else 'FAIL'}] {name}: {detail} ({time.perf_counter() - start:.1f} s)")

    def demo_model() -> str:
        folder = paths.demo_model_dir()
        engine = Engine()
        loaded = engine.load(folder)
        state["engine"] = engine
        runs_on = loaded.runs_on()
        return (f"{loaded.info.architecture}, hidden size {loaded.info.hidden_size}, on {runs_on['device']} "
                f"in {runs_on['why']}")

    def bundled_softprompts() -> str:
        with tempfile.TemporaryDirectory() as user:
            entries = SoftPromptLibrary(Path(user), [paths.bundled_softprompt_dir()]).scan()
        valid = [e for e in entries if e.valid]
        if not valid:
            raise RuntimeError(f"no readable soft prompt in {paths.bundled_softprompt_dir()}")
        fitting = fitting_bundled(state["engine"].hidden_size if "engine" in state else None)
        if not fitting:
            raise RuntimeError(f"no soft prompt in {paths.bundled_softprompt_dir()} fits the demo model")
        state["softprompt"] = fitting[0]
        state["softprompts"] = fitting
        fits = {e.path for e in fitting}
        return ", ".join(f"{e.name} ({e.softprompt.n_tokens} tokens{'' if e.path in fits else ', another model'})"
                         for e in valid)

    def generate_without() -> str:
        engine = state["engine"]
        result = engine.generate("And it came to pass", SamplingSettings(max_new_tokens=12, seed=1), softprompt=None)
        state["plain"] = result.text
        return repr(result.text)

    def load_softprompt_check() -> str:
        active = state["engine"].set_softprompt(state["softprompt"].path)
        return f"{active.name}, {active.n_tokens} tokens"

    def generate_with() -> str:
        result = state["engine"].generate("And it came to pass", SamplingSettings(max_new_tokens=12, seed=1))
        if result.generated_tokens == 0:
            raise RuntimeError("nothing was generated")
        return repr(result.text) + (" (differs from without)" if result.text != state["plain"] else "")

    def generate_with_mixture() -> str:
        from kobold_desktop.softprompt.mixture import Mixture, MixtureMember

        members = state["softprompts"]
        mixture = Mixture("self-test", "bayes", tuple(MixtureMember(e.path.name, 1.0) for e in members))
        active = state["engine"].prepare_mixture(mixture, [e.path for e in members])
        result = state["engine"].generate("And it came to pass", SamplingSettings(max_new_tokens=8, seed=1),
                                          softprompt=active)
        if result.generated_tokens == 0:
            raise RuntimeError("nothing was generated")
        weights = ", ".join(f"{w:.0%}" for w in result.mixture_weights)
        return f"{active.name}: {result.text!r}, weights now {weights}"

    def compressed(method: str) -> Callable[[], str]:
        def run() -> str:
            tensor = torch.randn(8, 16)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{method}.zip"
                if method == "deflate64":
                    _deflate64_zip(path, npy.encode(tensor))
                else:
                    kobold_zip.write(path, tensor, Metadata(name=method))
                softprompt, loaded = load_softprompt(path)
            if softprompt.compression != method or not torch.equal(loaded, tensor):
                raise RuntimeError(f"read back wrong ({softprompt.compression})")
            return f"{softprompt.n_tokens} x {softprompt.hidden_size} read back exactly"

        return run

    def local_server() -> str:
        import json
        import urllib.request

        from kobold_desktop.server.config import ServeConfig
        from kobold_desktop.server.http import KoboldServer
        from kobold_desktop.server.service import Service

        server = KoboldServer(Service(state["engine"], ServeConfig()), "127.0.0.1", 0).start()
        try:
            body = json.dumps({"prompt": "And it came to pass", "max_tokens": 4, "temperature": 0}).encode()
            request = urllib.request.Request(f"{server.url}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
        finally:
            server.stop()
        return f"{server.url}/v1/completions answered {reply['usage']['completion_tokens']} tokens"

    def window_code() -> str:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        from kobold_desktop.qt._qt import QApplication
        from kobold_desktop.qt.main_window import MainWindow  # noqa: F401 - that it imports is the check

        app = QApplication.instance() or QApplication([])
        return f"Qt {app.platformName()} platform"

    check("demo model loads", demo_model)
    check("bundled soft prompts list", bundled_softprompts)
    if "engine" in state:
        check("generates without a soft prompt", generate_without)
        if "softprompt" in state:
            check("loads a bundled soft prompt", load_softprompt_check)
            check("generates with it", generate_with)
            check("generates with a mixture of them", generate_with_mixture)
        check("the local server answers over HTTP", local_server)
    if getattr(sys, "frozen", False) or paths.demo_gguf().is_file():
        check("llama.cpp generates from the demo GGUF with a soft prompt", lambda: in_child("gguf"))
    check("reads a Deflate64 soft prompt zip", compressed("deflate64"))
    check("reads an LZMA soft prompt zip", compressed("lzma"))
    check("window code starts offscreen", window_code)
    failed = [name for name, ok in results if not ok]
    out(f"self-test: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or len(results) < 9 else 0


def fitting_bundled(hidden_size: int | None) -> list:
    """The bundled soft prompts that fit a model of this width: the demo model's own (the
    folder also carries SmolLM2's, of another width)."""
    from kobold_desktop.softprompt.library import SoftPromptLibrary

    with tempfile.TemporaryDirectory() as user:
        entries = SoftPromptLibrary(Path(user), [paths.bundled_softprompt_dir()]).scan()
    return [e for e in entries if e.valid and e.softprompt is not None and e.compatibility(hidden_size).ok]


def _gguf_check() -> str:
    """llama.cpp on the demo GGUF with a bundled soft prompt, against the float32
    transformers model token for token."""
    from kobold_desktop.engine import Engine, LoadOptions, SamplingSettings

    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    engine = Engine()
    loaded = engine.load(paths.demo_gguf())
    entries = fitting_bundled(loaded.hidden_size)
    try:
        active = engine.set_softprompt(entries[0].path) if entries else None
        result = engine.generate("And it came to pass", greedy)
        if result.generated_tokens == 0:
            raise RuntimeError("nothing was generated")
        runs_on = loaded.runs_on()
        detail = f"{runs_on['why']}, {loaded.precision}, {active.name if active else 'no soft prompt'}: "
    finally:
        engine.unload()
    reference = Engine()
    reference.load(paths.demo_model_dir(), LoadOptions(dtype="float32"))
    if entries:
        reference.set_softprompt(entries[0].path)
    theirs = reference.generate("And it came to pass", greedy)
    same = next((i for i, (a, b) in enumerate(zip(result.token_ids, theirs.token_ids)) if a != b), 12)
    return detail + f"first {same}/12 tokens as transformers in float32, {result.text!r}"


NATIVE_CHECKS = {"gguf": _gguf_check}
CHILD_PREFIX = "self-test-check: "


def run_native_check(name: str) -> int:
    """The child's side: run one native check, print its detail on one line."""
    try:
        detail = NATIVE_CHECKS[name]()
    except Exception as exc:  # noqa: BLE001 - reported to the parent as this check's failure
        print(f"{CHILD_PREFIX}{type(exc).__name__}: {exc}", flush=True)
        return 1
    print(f"{CHILD_PREFIX}{detail}", flush=True)
    return 0


def child_command(name: str) -> list[str]:
    """This program again (the bundle's executable, or Python with our package)."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "--self-test-check", name]
    return [sys.executable, "-m", "kobold_desktop", "--self-test-check", name]


def in_child(name: str, timeout: float = 600) -> str:
    """Run a native check in a child process; a crash becomes this check's failure, named."""
    done = subprocess.run(child_command(name), capture_output=True, text=True, timeout=timeout)
    lines = [line[len(CHILD_PREFIX):] for line in done.stdout.splitlines() if line.startswith(CHILD_PREFIX)]
    if done.returncode < 0:
        try:
            what = signal.Signals(-done.returncode).name
        except ValueError:
            what = f"signal {-done.returncode}"
        raise RuntimeError(f"crashed in native code ({what}); the last it printed: "
                           f"{(done.stderr.strip().splitlines() or ['nothing'])[-1][:300]}")
    if done.returncode != 0 or not lines:
        raise RuntimeError(lines[-1] if lines else f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return lines[-1]


if __name__ == "__main__":
    sys.exit(run_self_test())

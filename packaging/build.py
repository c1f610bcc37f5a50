"""Build the one-folder bundle (dist/kobold-desktop/) and prove it works.

    python packaging/build.py [--skip-check]

Runs PyInstaller with packaging/kobold-desktop.spec, then starts the bundled program
with --self-test in a clean environment (no virtual environment on PATH, a throwaway
home folder), then times a start-up to a visible window (--screenshot) and reports the
bundle's size. Exits non-zero if any of that fails, so a missing hidden import fails
the build, not a user. A GPU bundle needs a CUDA build of torch in the build environment.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kobold_desktop import APP_ID  # noqa: E402


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def clean_env(home: Path) -> dict[str, str]:
    """What a machine without Python would give the program."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "QT_QPA_PLATFORM": "offscreen",
            "KOBOLD_DESKTOP_HOME": str(home / "kobold")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-check", action="store_true", help="build only")
    args = parser.parse_args()
    if not (ROOT / "assets" / "demo-model" / "config.json").is_file():
        print("error: assets/demo-model is missing; build it with python assets/build_demo_model.py", file=sys.stderr)
        return 2
    demo_gguf = ROOT / "build" / "demo-model-q8_0.gguf"
    if not demo_gguf.is_file():  # the bundle ships the demo model for llama.cpp too
        from kobold_desktop.engine.llamacpp.convert import convert

        convert(ROOT / "assets" / "demo-model", demo_gguf, "q8_0")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "ERROR",
                    "--distpath", str(ROOT / "dist"), "--workpath", str(ROOT / "build" / "pyinstaller"),
                    str(ROOT / "packaging" / "kobold-desktop.spec")], check=True, cwd=ROOT)
    bundle = ROOT / "dist" / APP_ID
    program = bundle / (APP_ID + (".exe" if os.name == "nt" else ""))
    print(f"built {bundle} in {time.perf_counter() - start:.0f} s: {folder_size(bundle) / 2**20:.0f} MB")
    if args.skip_check:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        env = clean_env(Path(tmp))
        check = subprocess.run([str(program), "--self-test"], env=env, capture_output=True, text=True, timeout=600)
        print(check.stdout, end="")
        if check.returncode != 0:
            print(check.stderr, file=sys.stderr)
            print("error: the bundle's self-test failed", file=sys.stderr)
            return 1
        shot = Path(tmp) / "window.png"
        start = time.perf_counter()
        window = subprocess.run([str(program), "--screenshot", str(shot)], env=env, capture_output=True, text=True,
                                timeout=600)
        if window.returncode != 0 or not shot.is_file():
            print(window.stderr, file=sys.stderr)
            print("error: the bundle's window did not start", file=sys.stderr)
            return 1
        print(f"start-up to a visible window with the demo model loaded: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Can Qt open a window here? Asked before Qt is imported (Linux only).

Qt 6.5 and later need libxcb-cursor0 (and a few other xcb libraries) for their X11
plugin, and fresh Ubuntu and Debian desktops often lack it. Without it Qt prints "no Qt
platform plugin could be initialized" and aborts with a core dump; we say instead, in
one line, which package to install. A Wayland session needs none of them.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, Mapping

# What Qt's xcb platform plugin loads, and the Debian/Ubuntu package that has it.
X11_LIBRARIES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libX11-xcb.so.1": "libx11-xcb1",
}


def _loads(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def uses_x11(env: Mapping[str, str]) -> bool:
    """Whether Qt will use its X11 (xcb) plugin with this environment."""
    platform = env.get("QT_QPA_PLATFORM", "")
    if platform:
        return platform.split(":")[0].split(";")[0].strip() == "xcb"
    wayland = bool(env.get("WAYLAND_DISPLAY")) or env.get("XDG_SESSION_TYPE") == "wayland"
    return not wayland


def display_problem(env: Mapping[str, str] | None = None, platform: str | None = None,
                    loads: Callable[[str], bool] | None = None) -> str | None:
    """One line saying why the window cannot open here, or None when it can (as far as we can tell)."""
    env = os.environ if env is None else env
    loads = loads or _loads
    platform = platform or sys.platform
    if not platform.startswith("linux") or not uses_x11(env):
        return None
    missing = [package for library, package in X11_LIBRARIES.items() if not loads(library)]
    if missing:
        return (f"Qt needs {', '.join(missing)} to open a window on X11; install "
                f"{'it' if len(missing) == 1 else 'them'} with: sudo apt install {' '.join(missing)}")
    if not env.get("DISPLAY"):
        return ("no display to open the window on (DISPLAY is not set); run it from a desktop session, "
                "or use `kobold-desktop generate` or `kobold-desktop serve` without a window")
    return None

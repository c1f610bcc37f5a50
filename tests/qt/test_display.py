"""Before Qt starts: a missing X11 library is named in one line with its package (exit 2),
instead of Qt's abort and core dump."""

import subprocess
import sys

from kobold_desktop.qt import display
from kobold_desktop.qt.display import X11_LIBRARIES, display_problem, uses_x11

X11 = {"DISPLAY": ":0"}


def missing(*names):
    return lambda library: library not in names


def test_a_missing_xcb_cursor_names_the_package_to_install():
    problem = display_problem(X11, "linux", missing("libxcb-cursor.so.0"))
    assert problem == ("Qt needs libxcb-cursor0 to open a window on X11; install it with: "
                       "sudo apt install libxcb-cursor0")


def test_every_missing_library_is_named_once():
    problem = display_problem(X11, "linux", missing("libxcb-cursor.so.0", "libxkbcommon-x11.so.0"))
    assert problem.endswith("sudo apt install libxcb-cursor0 libxkbcommon-x11-0")
    assert "them" in problem


def test_nothing_is_said_when_the_libraries_are_there_or_not_needed():
    assert display_problem(X11, "linux", lambda _: True) is None
    nothing = missing(*X11_LIBRARIES)
    assert display_problem({"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}, "linux", nothing) is None
    assert display_problem({"XDG_SESSION_TYPE": "wayland"}, "linux", nothing) is None
    assert display_problem({"QT_QPA_PLATFORM": "offscreen"}, "linux", nothing) is None
    assert display_problem(X11, "win32", nothing) is None and display_problem(X11, "darwin", nothing) is None


def test_xcb_asked_for_by_name_is_checked_even_in_a_wayland_session():
    assert uses_x11({"QT_QPA_PLATFORM": "xcb", "WAYLAND_DISPLAY": "wayland-0"})
    assert not uses_x11({"QT_QPA_PLATFORM": "wayland;xcb"})


def test_no_display_at_all_is_explained():
    problem = display_problem({}, "linux", lambda _: True)
    assert "DISPLAY is not set" in problem and "kobold-desktop serve" in problem


def test_the_library_check_really_loads_libraries():
    assert display._loads("libc.so.6")
    assert not display._loads("libkobold-does-not-exist.so.0")


def test_the_window_command_exits_2_with_the_line(tmp_path):
    """The real command, with the X11 plugin asked for and a library made missing."""
    code = (
        "import sys\n"
        "from kobold_desktop.qt import display\n"
        "display._loads = lambda name: name != 'libxcb-cursor.so.0'\n"
        "from kobold_desktop.cli import main\n"
        "sys.exit(main([]))\n"
    )
    env = {"QT_QPA_PLATFORM": "xcb", "DISPLAY": ":0", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: Qt needs libxcb-cursor0 to open a window on X11; install it with: sudo apt install libxcb-cursor0"]
    assert "PySide6" not in result.stdout


def test_the_table_covers_what_qts_x11_plugin_really_links():
    """Read the installed PySide6's xcb plugin: every X11 library it needs is in our table."""
    import shutil
    from pathlib import Path

    import PySide6
    import pytest

    qt = Path(PySide6.__file__).parent / "Qt"
    binaries = [qt / "plugins" / "platforms" / "libqxcb.so", *sorted((qt / "lib").glob("libQt6XcbQpa.so*"))[:1]]
    if not sys.platform.startswith("linux") or not shutil.which("ldd") or not binaries[0].is_file():
        pytest.skip("Linux with ldd and PySide6's xcb plugin")
    linked = set()
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        linked |= {line.split()[0] for line in out.splitlines() if "xcb" in line or "xkb" in line}
    linked -= {"libQt6XcbQpa.so.6"}
    assert linked and linked <= set(X11_LIBRARIES), linked - set(X11_LIBRARIES)

"""Does the window stay responsive? The event loop's stall while the app works.

    QT_QPA_PLATFORM=offscreen python benchmarks/window_stall.py [--tokens 500] [--softprompts 50]

A timer asks to run every 5 ms on the GUI thread; how late each tick comes is the time
the event loop could not answer (a click, a key, a repaint). It is recorded while the
real window, on the embedded demo model:
- streams 500 tokens (Submit, then Generate more until 500 tokens have streamed);
- starts and stops the local API server three times;
- imports 50 soft prompts dropped onto it at once.
For each, p50, p99 and the worst tick are printed, and p99 against the target of 50 ms
(a ratio above 1 meets it). Runs in a throwaway home folder; touches none of yours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET_MS = 50.0
TICK_MS = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--softprompts", type=int, default=50)
    parser.add_argument("--server-rounds", type=int, default=3)
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="kobold-stall-")
    os.environ["HOME"] = home
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["XDG_DATA_HOME"] = str(Path(home) / "data")
    os.environ["XDG_CONFIG_HOME"] = str(Path(home) / "config")
    os.environ["XDG_CACHE_HOME"] = str(Path(home) / "cache")

    import torch
    from PySide6.QtCore import QElapsedTimer, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from kobold_desktop import paths
    from kobold_desktop.qt.main_window import MainWindow
    from kobold_desktop.qt.worker import ModelWorker
    from kobold_desktop.settings import Settings
    from kobold_desktop.softprompt import Metadata, kobold_zip
    from kobold_desktop.softprompt.library import SoftPromptLibrary

    import gc

    gc.freeze()  # as kobold_desktop.qt.app.run_window does
    app = QApplication.instance() or QApplication(sys.argv[:1])
    settings = Settings()
    window = MainWindow(ModelWorker(), SoftPromptLibrary(settings=settings), settings)
    window.show()

    def wait(condition, timeout=600.0):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the window did not finish in time")
            app.processEvents()
            time.sleep(0.001)

    lateness: list[float] = []
    clock = QElapsedTimer()
    last = [0]

    def tick():
        now = clock.nsecsElapsed()
        if last[0]:
            lateness.append(max(0.0, (now - last[0]) / 1e6 - TICK_MS))
        last[0] = now

    probe = QTimer(interval=TICK_MS)
    probe.setTimerType(Qt.PreciseTimer)
    probe.timeout.connect(tick)

    def measure(name: str, work, done) -> dict:
        lateness.clear()
        last[0] = 0
        clock.start()
        probe.start()
        started = time.perf_counter()
        work()
        while not done():
            app.processEvents()  # the loop runs as in app.exec(); the probe's ticks are its own
            time.sleep(0.0005)
        seconds = time.perf_counter() - started
        probe.stop()
        values = sorted(lateness)
        p = lambda q: values[min(len(values) - 1, int(q * len(values)))] if values else 0.0  # noqa: E731
        row = {"name": name, "ticks": len(values), "p50": statistics.median(values) if values else 0.0,
               "p99": p(0.99), "max": values[-1] if values else 0.0, "seconds": seconds}
        print(f"{name:<40} {row['ticks']:>6} ticks  p50 {row['p50']:6.1f} ms  p99 {row['p99']:6.1f} ms  "
              f"worst {row['max']:6.1f} ms  ({seconds:.1f} s)", flush=True)
        return row

    demo = paths.demo_model_dir()
    print(f"Loading the demo model ({demo}) ...", flush=True)
    window.load_model(str(demo))
    wait(lambda: window.busy_job is None and window.model_status is not None)
    panel = window.sampler_panel
    panel.max_new_tokens.setValue(100)
    panel.temperature.setValue(0.8)
    panel.context_size.setValue(window.model_status.context_length)
    torch.manual_seed(0)
    rows = []

    streamed = {"tokens": 0}
    window.worker.generated.connect(lambda r: streamed.update(tokens=streamed["tokens"] + r.generated_tokens))

    def stream_all():
        window.input.setPlainText("The lighthouse keeper climbed the stairs")
        window.submit()

    def streaming_done():
        if window.busy_job is not None:
            return False
        if streamed["tokens"] >= args.tokens:
            return True
        window.generate_more()  # the next part of the 500 tokens (the model may stop early at EOS)
        return False

    rows.append(measure(f"streaming {args.tokens} tokens", stream_all, streaming_done))
    print(f"  ({streamed['tokens']} tokens streamed)")

    state = {"round": 0, "phase": "start"}

    def server_step():
        control = window.server_control
        if state["phase"] == "start" and control.state == "stopped":
            if state["round"] == args.server_rounds:
                return True
            window.start_server(port=0)
            state["phase"] = "stop"
        elif state["phase"] == "stop" and control.state == "running":
            window.stop_server()
            state["phase"] = "start"
            state["round"] += 1
        return False

    rows.append(measure(f"server start and stop x{args.server_rounds}", lambda: None, server_step))

    source = Path(home) / "to-import"
    source.mkdir()
    hidden = window.model_status.hidden_size
    files = []
    for i in range(args.softprompts):
        files.append(source / f"style {i:02d}.zip")
        kobold_zip.write(files[-1], torch.randn(20, hidden) * 0.02, Metadata(name=f"Style {i:02d}"))
    rows.append(measure(f"importing {args.softprompts} soft prompts", lambda: window.handle_dropped_paths(files),
                        lambda: not window.importing))
    imported = len(list(paths.user_softprompt_dir().glob("*.zip")))
    print(f"  ({imported} soft prompts in the library)")

    print()
    print(f"p99 against the target of {TARGET_MS:.0f} ms (above 1 meets it):")
    for row in rows:
        ratio = TARGET_MS / row["p99"] if row["p99"] > 0 else float("inf")
        print(f"  {row['name']:<40} {ratio:6.1f}x  {'met' if row['p99'] < TARGET_MS else 'NOT met'}")
    window.close()
    wait(lambda: window.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())

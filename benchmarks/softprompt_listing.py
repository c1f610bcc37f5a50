"""How fast the library lists soft prompts, against loading each one fully.

Builds 1,000 LZMA soft prompt zips (the way KoboldAI's tuners write them), then times:
  - scan:     SoftPromptLibrary.scan() from cold (reads headers only)
  - refresh:  a second scan with nothing changed (stat only)
  - baseline: what a loader that decompresses every tensor does (load_softprompt on each)
and prints the ratios. Target: a cold scan of 1,000 well under a second.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kobold_desktop.settings import Settings  # noqa: E402
from kobold_desktop.softprompt import Metadata, load_softprompt  # noqa: E402
from kobold_desktop.softprompt import kobold_zip  # noqa: E402
from kobold_desktop.softprompt.library import SoftPromptLibrary  # noqa: E402

COUNT = 1000
N_TOKENS, HIDDEN = 80, 1024  # ~330 KB of float32 per soft prompt


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "softprompts"
        folder.mkdir()
        template = folder / "template.zip"
        kobold_zip.write(template, torch.randn(N_TOKENS, HIDDEN), Metadata(name="Template"))
        data = template.read_bytes()
        template.unlink()
        for i in range(COUNT):
            (folder / f"sp{i:04d}.zip").write_bytes(data)

        library = SoftPromptLibrary(folder, [], settings=Settings(Path(tmp) / "s.json"))
        start = time.perf_counter()
        entries = library.scan()
        scan_s = time.perf_counter() - start
        assert len(entries) == COUNT and all(e.valid for e in entries)

        start = time.perf_counter()
        library.refresh()
        refresh_s = time.perf_counter() - start

        start = time.perf_counter()
        for entry in entries:
            load_softprompt(entry.path)
        full_s = time.perf_counter() - start

    print(f"soft prompts:              {COUNT} x [{N_TOKENS}, {HIDDEN}] float32, LZMA")
    print(f"cold scan (headers only):  {scan_s:.3f} s")
    print(f"refresh (nothing changed): {refresh_s:.3f} s")
    print(f"baseline (full loads):     {full_s:.3f} s")
    print(f"ratio baseline / scan:     {full_s / scan_s:.1f}x")
    print(f"ratio baseline / refresh:  {full_s / refresh_s:.1f}x")
    print(f"target cold scan < 1 s:    {'met' if scan_s < 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()

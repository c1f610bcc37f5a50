"""Make assets/screenshot.png for the README with `kobold-desktop --screenshot`.

A throwaway home folder gets a short story written by the demo model with the Psalms
soft prompt (as the window's autosave, which it restores at start); then the window
starts with that soft prompt loaded and saves itself as PNG.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from kobold_desktop.engine import Engine, SamplingSettings
    from kobold_desktop.story import Action, Story
    from kobold_desktop.story.files import save_story

    engine = Engine()
    engine.load(ROOT / "assets" / "demo-model")
    engine.set_softprompt(ROOT / "softprompts" / "Proverbs.zip")
    prompt = "My son, hear the instruction of thy father,"
    first = engine.generate(prompt, SamplingSettings(max_new_tokens=60, seed=7, temperature=0.7)).text
    user = " A wise man"
    second = engine.generate(prompt + first + user, SamplingSettings(max_new_tokens=60, seed=3, temperature=0.7)).text
    story = Story(title="Sayings of the wise", prompt=prompt, actions=[Action(first), Action(user, "user"), Action(second)],
                  memory="Sayings of wisdom for a son.")
    with tempfile.TemporaryDirectory() as home:
        save_story(story, Path(home) / "data" / "autosave.json")
        env = {**os.environ, "KOBOLD_DESKTOP_HOME": home, "QT_QPA_PLATFORM": "offscreen"}
        out = ROOT / "assets" / "screenshot.png"
        subprocess.run([sys.executable, "-m", "kobold_desktop", "--softprompt", "Proverbs", "--screenshot", str(out)],
                       env=env, check=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

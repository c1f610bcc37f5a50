"""Mixtures in the window: listed with members, built by ticking, loaded, weights shown
while streaming, learned from the story, trained from the Create dialog."""

import torch
from PySide6.QtCore import Qt

from kobold_desktop.paths import user_softprompt_dir
from kobold_desktop.softprompt import Metadata, kobold_zip
from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, read_mixture, write_mixture

from ..tuning.conftest import PATTERN
from .conftest import LOAD_TIMEOUT, make_window
from .test_window import run_job


def add_softprompts(hidden=32):
    torch.manual_seed(7)
    kobold_zip.write(user_softprompt_dir() / "Proverbs.zip", torch.randn(4, hidden) * 2, Metadata(name="Proverbs"))
    kobold_zip.write(user_softprompt_dir() / "Leviticus.zip", torch.randn(6, hidden) * 2,
                     Metadata(name="Laws of Leviticus"))


def test_a_mixture_file_is_listed_loaded_and_lit(qtbot, window):
    add_softprompts()
    write_mixture(user_softprompt_dir() / "Scripture.json",
                  Mixture("Scripture", "bayes", (MixtureMember("Proverbs.zip", 0.7), MixtureMember("Leviticus.zip", 0.3))))
    panel = window.softprompt_panel
    panel.refresh()
    panel.select(user_softprompt_dir() / "Scripture.json")
    item = panel.list.currentItem()
    assert item.text().startswith("Scripture (mixture, bayes)") and "Proverbs 70% + Leviticus 30%" in item.text()
    assert "70%  Proverbs (4 tokens)" in panel.details.text() and "30%  Laws of Leviticus (6 tokens)" in panel.details.text()
    run_job(qtbot, window, lambda: qtbot.mouseClick(panel.load_button, Qt.LeftButton))
    assert window.light.is_green
    assert window.light.label.text().startswith("Mixture: Proverbs 70% + Laws of Leviticus 30%")
    assert panel.selected_entry().file_name == "Scripture.json"  # the list shows what the light shows
    assert panel.list.currentItem().font().bold()
    # while text streams, the panel shows each member's weight as the story moves it
    run_job(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    assert panel.live_weights.isVisible()
    assert panel.live_weights.text().startswith("Weights now: Proverbs ")
    assert "Laws of Leviticus" in panel.live_weights.text()


def test_a_mixture_with_a_missing_or_wrong_member_is_greyed_and_cannot_load(qtbot, window):
    add_softprompts()
    kobold_zip.write(user_softprompt_dir() / "Wide.zip", torch.randn(3, 48), Metadata(name="Wide"))
    write_mixture(user_softprompt_dir() / "Gone.json",
                  Mixture("Gone", "fixed", (MixtureMember("Proverbs.zip", 1), MixtureMember("Lost.zip", 1))))
    write_mixture(user_softprompt_dir() / "WideMix.json",
                  Mixture("WideMix", "fixed", (MixtureMember("Proverbs.zip", 1), MixtureMember("Wide.zip", 1))))
    panel = window.softprompt_panel
    panel.refresh()
    for name, reason in (("Gone.json", "member 'Lost.zip' is missing"), ("WideMix.json", "member 'Wide.zip'")):
        panel.select(user_softprompt_dir() / name)
        assert reason in panel.list.currentItem().text()
        assert not panel.load_button.isEnabled()
    # loaded anyway (a file changed behind our back): refused, the previous soft prompt stays
    panel.select(user_softprompt_dir() / "Proverbs.zip")
    run_job(qtbot, window, lambda: qtbot.mouseClick(panel.load_button, Qt.LeftButton))
    window.notices.clear()
    run_job(qtbot, window, lambda: window.choose_softprompt(user_softprompt_dir() / "WideMix.json"))
    assert window.light.label.text() == "Active soft prompt (4 tokens): Proverbs"
    assert any("member 'Wide.zip' cannot be used" in text for _, text in window.notices)


def test_build_a_mixture_by_ticking(qtbot, window):
    add_softprompts()
    window.softprompt_panel.refresh()
    qtbot.mouseClick(window.softprompt_panel.mixture_button, Qt.LeftButton)
    from kobold_desktop.qt.mixture_dialogs import MixtureDialog

    dialog = window.findChild(MixtureDialog)
    assert dialog is not None and not dialog.save_button.isEnabled()
    dialog.name.setText("Two styles")
    for tick, spin, weight in zip(dialog.members.ticks, dialog.members.weights, (25, 75)):
        tick.setChecked(True)
        spin.setValue(weight)
    dialog.mode.setCurrentIndex(1)
    qtbot.mouseClick(dialog.save_button, Qt.LeftButton)
    mixture = read_mixture(user_softprompt_dir() / "Two styles.json")
    assert mixture.mode == "fixed"
    assert {m.softprompt: m.weight for m in mixture.members} == {"Leviticus.zip": 0.25, "Proverbs.zip": 0.75}
    assert window.softprompt_panel.selected_entry().file_name == "Two styles.json"


def test_learn_weights_from_this_story(qtbot, window):
    add_softprompts()
    window.softprompt_panel.refresh()
    window.view.setPlainText("Once upon a time there was a little dragon who lived in a cave by the sea. " * 40)
    dialog = window.show_learn_dialog()
    assert dialog.from_story.isChecked()
    for tick in dialog.members.ticks:
        tick.setChecked(True)
    dialog.name.setText("From my story")
    run_job(qtbot, window, lambda: qtbot.mouseClick(dialog.learn_button, Qt.LeftButton))
    assert dialog.progress.value() == 100 and dialog.ranking is not None
    assert "Mixture with the learned weights" in dialog.result.text()
    assert dialog.save_button.isEnabled()
    qtbot.mouseClick(dialog.save_button, Qt.LeftButton)
    mixture = read_mixture(user_softprompt_dir() / "From my story.json")
    assert sum(m.weight for m in mixture.members) == 1.0 or abs(sum(m.weight for m in mixture.members) - 1) < 1e-5


def test_create_dialog_trains_a_mixture(qtbot, tune_model_dir, tmp_path):
    window = make_window(qtbot)
    with qtbot.waitSignal(window.ready, timeout=LOAD_TIMEOUT):
        window.load_model(str(tune_model_dir))
    data = tmp_path / "styles.txt"
    data.write_text((PATTERN * 8 + " the sea was calm and grey" * 8) * 40)
    dialog = window.show_tune_dialog()
    dialog.add_paths([data])
    dialog.tokens.setValue(4)
    dialog.steps.setValue(6)
    dialog.members.setValue(2)
    qtbot.mouseClick(dialog.start_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: window.busy_job is None, timeout=120_000)
    mixture = read_mixture(user_softprompt_dir() / "styles.json")
    assert [m.softprompt for m in mixture.members] == ["styles-1.zip", "styles-2.zip"]
    assert "Created the mixture styles.json of 2 soft prompts" in dialog.status.text()
    assert window.softprompt_panel.selected_entry().file_name == "styles.json"


def test_server_menu_serves_a_mixture_as_a_model(qtbot, window):
    add_softprompts()
    write_mixture(user_softprompt_dir() / "Scripture.json",
                  Mixture("Scripture", "bayes", (MixtureMember("Proverbs.zip", 0.7), MixtureMember("Leviticus.zip", 0.3))))
    from .test_server_menu import call, serve, stop

    url = serve(qtbot, window)
    try:
        status, models = call(url, "GET", "/v1/models")
        assert "Scripture" in [m["id"] for m in models["data"]]
        status, body = call(url, "POST", "/v1/completions", {"model": "Scripture", "prompt": "Once", "max_tokens": 5})
        assert status == 200 and body["choices"][0]["text"]
    finally:
        stop(qtbot, window)

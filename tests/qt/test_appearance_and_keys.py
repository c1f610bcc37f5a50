"""Long writing: dark theme, the story's font, focus mode, accessible names and the keyboard."""

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QApplication, QWidget

from kobold_desktop.qt.accessible import CONTROL_TYPES, name_controls
from kobold_desktop.qt.appearance import Appearance
from kobold_desktop.settings import Settings
from kobold_desktop.story import Action, Story

from .conftest import make_window
from .test_window import run_job


def activate(qtbot, window):
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window)


def test_every_control_has_an_accessible_name(bare_window):
    window = bare_window
    unnamed = [w for w in window.findChildren(QWidget)
               if isinstance(w, CONTROL_TYPES) and w.isVisibleTo(window) and not w.accessibleName()]
    assert unnamed == [], [type(w).__name__ for w in unnamed]
    assert window.submit_button.accessibleName() == "Submit"
    assert window.input.accessibleName() == "Your next lines"
    assert window.sampler_panel.temperature.accessibleName() == "Temperature"
    assert window.appearance_panel.theme.accessibleName() == "Theme"


def test_the_dialogs_controls_have_accessible_names(bare_window):
    from kobold_desktop.qt.model_dialog import ModelDialog
    from kobold_desktop.qt.tune_dialog import TuneDialog

    for dialog in (TuneDialog(bare_window), ModelDialog([], "", bare_window)):
        assert name_controls(dialog) == []


def test_dark_theme_from_settings_and_back(qtbot, bare_window):
    window = bare_window
    panel = window.appearance_panel
    window.story.prompt = "Once"
    window.story.actions.append(Action(" more", "model"))
    window.show_story()
    panel.theme.setCurrentIndex(panel.theme.findData("dark"))
    palette = QApplication.palette()
    assert palette.color(QPalette.Base).lightness() < 60 and palette.color(QPalette.Text).lightness() > 200
    assert window.scheme == "dark" and window.settings.get("appearance")["theme"] == "dark"
    assert window.view.user_color.lightness() > 150  # the writer's words stay readable on a dark page
    panel.theme.setCurrentIndex(panel.theme.findData("light"))
    assert QApplication.palette().color(QPalette.Base).lightness() > 200
    assert window.story.text == "Once more"  # re-shown in the new colours, nothing lost


def test_the_theme_follows_the_system_unless_chosen(qtbot, bare_window, monkeypatch):
    from kobold_desktop.qt import appearance

    window = bare_window
    monkeypatch.setattr(appearance, "system_scheme", lambda: "dark")
    window.follow_system_scheme()  # what the desktop's colorSchemeChanged calls
    assert window.scheme == "dark"
    window.appearance_panel.theme.setCurrentIndex(window.appearance_panel.theme.findData("light"))
    window.follow_system_scheme()
    assert window.scheme == "light"


def test_story_font_and_size_are_applied_and_remembered(qtbot):
    settings = Settings()
    window = make_window(qtbot, settings)
    panel = window.appearance_panel
    panel.font_size.setValue(18)
    assert window.view.font().pointSize() == 18
    family = panel.font_family.currentFont().family()
    window.close()
    again = make_window(qtbot, Settings())
    assert again.view.font().pointSize() == 18 and again.appearance.font_family == family
    assert again.appearance_panel.font_size.value() == 18


def test_a_bad_stored_appearance_falls_back_to_defaults():
    assert Appearance.from_dict({"theme": "neon", "font_size": 900, "font_family": 3}) == Appearance()
    assert Appearance.from_dict("not a dict") == Appearance()


def test_focus_mode_hides_the_side_panel_with_f11_and_is_remembered(qtbot, bare_window):
    window = bare_window
    activate(qtbot, window)
    assert window.tabs.isVisible()
    qtbot.keyClick(window.input, Qt.Key_F11)
    assert not window.tabs.isVisible() and window.focus_action.isChecked()
    assert window.settings.get("appearance")["focus_mode"] is True
    qtbot.keyClick(window.input, Qt.Key_F11)
    assert window.tabs.isVisible() and not window.focus_action.isChecked()


@pytest.mark.parametrize("key,modifiers,action", [
    (Qt.Key_Return, Qt.ControlModifier, "submit"),
    (Qt.Key_Return, Qt.ControlModifier | Qt.ShiftModifier, "more"),
    (Qt.Key_R, Qt.ControlModifier, "retry"),
])
def test_writing_shortcuts(qtbot, window, key, modifiers, action):
    window.session.replace(Story(prompt="Once", actions=[Action(" upon", "model")]))
    window.show_story()
    activate(qtbot, window)
    window.input.setFocus()
    triggered = []
    window.story_actions[action].triggered.connect(lambda: triggered.append(action))
    qtbot.keyClick(window.input, key, modifiers)
    assert triggered == [action] and window.busy_job == "generate"
    qtbot.waitUntil(lambda: window.busy_job is None, timeout=60_000)


def test_stop_undo_redo_and_load_from_the_keyboard(qtbot, window, tmp_path):
    import torch

    from kobold_desktop.paths import user_softprompt_dir
    from kobold_desktop.softprompt import Metadata, kobold_zip

    activate(qtbot, window)
    window.sampler_panel.max_new_tokens.setValue(200)
    window.input.setPlainText("The dragon")
    qtbot.keyClick(window.input, Qt.Key_Return, Qt.ControlModifier)
    assert window.generating
    qtbot.keyClick(window.input, Qt.Key_Escape)  # Stop
    qtbot.waitUntil(lambda: window.busy_job is None, timeout=60_000)
    assert window.last_result.finish_reason in ("cancelled", "length", "stop")
    actions = list(window.story.actions)
    qtbot.keyClick(window.input, Qt.Key_Z, Qt.AltModifier)  # Undo
    assert window.story.actions == actions[:-1]
    qtbot.keyClick(window.input, Qt.Key_Y, Qt.AltModifier)  # Redo
    assert window.story.actions == actions
    kobold_zip.write(user_softprompt_dir() / "keys.zip", torch.randn(2, 32), Metadata(name="Keys"))
    window.softprompt_panel.refresh()
    window.softprompt_panel.select(user_softprompt_dir() / "keys.zip")
    run_job(qtbot, window, lambda: qtbot.keyClick(window.input, Qt.Key_L, Qt.ControlModifier))
    assert window.light.is_green


def test_buttons_say_their_shortcuts(bare_window):
    assert bare_window.submit_button.toolTip() == "Submit (Ctrl+Return)"
    assert bare_window.stop_button.toolTip() == "Stop (Escape)"
    assert "Ctrl+L" in bare_window.softprompt_panel.load_button.toolTip()

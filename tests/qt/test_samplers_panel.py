"""The Settings tab: every sampler, grouped, with a tooltip; presets; the settings that travel
with the story; and what the window writes obeys them."""

from dataclasses import fields

from kobold_desktop.engine import SamplingSettings
from kobold_desktop.qt._qt import QGroupBox, Qt
from kobold_desktop.qt.editors import SamplerPanel
from kobold_desktop.settings import Settings

from .test_window import generate

EVERY_CHANGED = SamplingSettings(
    max_new_tokens=33, temperature=1.3, top_k=40, top_p=0.8, min_p=0.05, typical_p=0.9,
    repetition_penalty=1.15, repetition_penalty_range=512, seed=42, top_a=0.2, tfs=0.95,
    dynatemp_range=0.5, dynatemp_exponent=1.5, smoothing_factor=0.3, smoothing_curve=1.5, top_n_sigma=1.5,
    xtc_threshold=0.15, xtc_probability=0.4, dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=3, dry_range=256,
    dry_sequence_breakers=("\n", "Narrator:"), presence_penalty=0.3, frequency_penalty=-0.2,
    repetition_penalty_slope=0.7, mirostat=2, mirostat_tau=4.0, mirostat_eta=0.2, logit_bias=((198, -2.0), (5, 1.5)),
    banned_tokens=(7, 9), banned_phrases=("suddenly", "/shivers? down/"), sampler_order=(6, 5, 0, 1, 3, 4, 2))


def test_every_sampler_has_an_input_with_a_tooltip_in_its_group(qtbot):
    panel = SamplerPanel()
    qtbot.addWidget(panel)
    for field in fields(SamplingSettings):
        if field.name == "stop":
            continue  # stop sequences belong to a request, not to the window
        widget = getattr(panel, field.name)
        assert widget.toolTip(), field.name
    titles = [box.title() for box in panel.findChildren(QGroupBox)]
    assert titles == ["Basic", "Repetition", "Advanced"]


def test_what_is_shown_is_what_is_read_back(qtbot):
    panel = SamplerPanel()
    qtbot.addWidget(panel)
    panel.set_settings(EVERY_CHANGED)
    assert panel.settings() == EVERY_CHANGED


def test_a_preset_sets_the_samplers_and_saved_presets_persist(qtbot, tmp_path):
    settings = Settings(tmp_path / "settings.json")
    panel = SamplerPanel(app_settings=settings)
    qtbot.addWidget(panel)
    panel.max_new_tokens.setValue(77)
    panel.choose_preset("Simple Logical (Lite)")
    chosen = panel.settings()
    assert (chosen.temperature, chosen.top_p, chosen.repetition_penalty_slope) == (0.3, 0.6, 0.7)
    assert chosen.max_new_tokens == 77  # a preset never changes the length to write
    panel.dry_multiplier.setValue(0.8)
    panel.save_preset("Mine")
    again = SamplerPanel(app_settings=Settings(tmp_path / "settings.json"))
    qtbot.addWidget(again)
    assert "Mine" in again.presets()
    again.choose_preset("Mine")
    assert again.settings().dry_multiplier == 0.8 and again.settings().temperature == 0.3
    again.delete_preset("Mine")
    assert "Mine" not in SamplerPanel(app_settings=Settings(tmp_path / "settings.json")).presets()


def test_a_bad_entry_is_refused_with_the_fields_name(qtbot):
    from kobold_desktop.engine.sampling import SettingsError

    panel = SamplerPanel()
    qtbot.addWidget(panel)
    panel.logit_bias.setText("198:-2, oops")
    try:
        panel.settings()
    except SettingsError as exc:
        assert "Logit bias" in str(exc)
    else:
        raise AssertionError("a bad logit bias was read")


def test_the_settings_travel_with_the_story_file(qtbot, window, tmp_path):
    window.sampler_panel.set_settings(EVERY_CHANGED.with_changes(mirostat=0))
    path = tmp_path / "story.json"
    window.files.save_as(path)
    window.sampler_panel.reset()
    window.files.open_story(path)
    assert window.sampler_panel.settings() == EVERY_CHANGED.with_changes(mirostat=0)


def test_the_window_writes_with_the_panels_samplers(qtbot, window):
    window.sampler_panel.max_new_tokens.setValue(16)
    window.input.setPlainText("Once upon a time")
    first = generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    phrase = next(first.text[i:i + 2] for i in range(len(first.text) - 2)
                  if first.text[i:i + 2].isprintable() and first.text[i:i + 2].strip() and "\ufffd" not in first.text[i:i + 2])
    window.sampler_panel.banned_phrases.setPlainText(phrase)
    again = generate(qtbot, window, lambda: qtbot.mouseClick(window.retry_button, Qt.LeftButton))
    assert phrase.lower() not in again.text.lower()


def test_the_status_bar_reports_the_cache_after_a_turn(qtbot, window):
    window.sampler_panel.max_new_tokens.setValue(4)
    window.input.setPlainText("Once upon a time")
    generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    assert "read all" in window.statusBar().currentMessage()
    generate(qtbot, window, lambda: qtbot.mouseClick(window.more_button, Qt.LeftButton))
    assert "from the cache" in window.statusBar().currentMessage()  # the next turn read only what is new

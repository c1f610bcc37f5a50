"""Creating soft prompts and mixtures from the window: the Create dialog (tuning), the
Learn-weights dialog (ranking) and the New-mixture dialog. The training itself runs as a
job on the model's thread (`ModelWorker.tune` and `rank`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kobold_desktop.errors import KoboldError
from kobold_desktop.qt._qt import QObject
from kobold_desktop.qt.mixture_dialogs import LearnWeightsDialog, MixtureDialog
from kobold_desktop.qt.softprompt_panel import SoftPromptPanel
from kobold_desktop.qt.tune_dialog import TuneDialog, TuneRequest
from kobold_desktop.qt.window_state import Job, WindowState
from kobold_desktop.qt.worker import ModelWorker
from kobold_desktop.softprompt.library import SoftPromptLibrary
from kobold_desktop.story import Story


class TuningHost(Protocol):
    """What creating soft prompts needs of the window (the `MainWindow` is one)."""

    state: WindowState
    worker: ModelWorker
    library: SoftPromptLibrary
    softprompt_panel: SoftPromptPanel
    tabs: Any  # the side tabs: the panel is shown when a soft prompt is made
    story: Story

    def begin_job(self, job: Job) -> None: ...
    def sync_story(self) -> None: ...
    def stop(self) -> None: ...
    def notify(self, title: str, text: str, error: bool = False) -> None: ...
    def statusBar(self) -> Any: ...


class TuningControl(QObject):
    def __init__(self, window: TuningHost):
        super().__init__(window)
        self.window = window
        self.tune_dialog: TuneDialog | None = None
        self.learn_dialog: LearnWeightsDialog | None = None
        worker = window.worker
        worker.tune_progress.connect(self.on_tune_progress)
        worker.tuned.connect(self.on_tuned)
        worker.rank_progress.connect(self.on_rank_progress)
        worker.ranked.connect(self.on_ranked)
        worker.finished.connect(self.on_finished)

    def _show_new(self, path: Path) -> None:
        panel = self.window.softprompt_panel
        panel.refresh()
        panel.select(path)
        self.window.tabs.setCurrentWidget(panel)

    # -- creating a soft prompt -----------------------------------------------------------------

    def show_tune_dialog(self) -> TuneDialog:
        if self.tune_dialog is None:
            self.tune_dialog = TuneDialog(self.window)
            self.tune_dialog.start_requested.connect(self.start_tuning)
            self.tune_dialog.cancel_requested.connect(self.window.stop)
        note = self.training_note()
        if note:
            self.tune_dialog.status.setText(note)
        self.tune_dialog.show()
        self.tune_dialog.raise_()
        return self.tune_dialog

    def training_note(self) -> str:
        """With a GGUF loaded: what training on it will take (its weights are read through
        transformers first: engine/llamacpp/dequantize.py), said before Start."""
        model = self.window.state.model
        if model is None or model.remote or not model.source.lower().endswith(".gguf"):
            return ""
        from kobold_desktop.engine.device import choose_device, dtype_choice, training_dtype
        from kobold_desktop.engine.llamacpp.dequantize import plan

        device = choose_device(None)
        dtype = dtype_choice(device, training_dtype(device))[0]  # what the worker's load_trainable will use
        try:
            said = plan(model.source, dtype).describe()
        except (KoboldError, OSError) as exc:
            return f"This GGUF runs on llama.cpp, which cannot train: {exc}"
        return (f"This GGUF runs on llama.cpp, which cannot train. Start reads its weights through transformers: "
                f"{said}.")

    def start_tuning(self, request: TuneRequest) -> None:
        window = self.window
        if window.state.model is None or window.state.busy:
            message = "Load a model first." if window.state.model is None else "Wait until the model is free."
            self.tune_dialog.finish(message)
            return
        window.begin_job(Job.TUNE)
        window.worker.tune(request)

    def on_tune_progress(self, progress) -> None:
        if self.tune_dialog is not None:
            self.tune_dialog.show_progress(progress)

    def on_tuned(self, path: Path | None, result) -> None:
        if path is None:
            message = (f"Cancelled at step {result.steps_done}. Start again with the same settings to go on "
                       "from there.")
        elif path.suffix == ".json":  # a mixture: its members and the mixture file
            losses = ""
            if result.mixture_held_out_loss is not None:
                losses = (f" Held-out loss {result.mixture_held_out_loss:.3f} with the mixture, "
                          f"{result.baseline_held_out_loss:.3f} without a soft prompt.")
            message = (f"Created the mixture {path.name} of {len(result.tensors)} soft prompts (weights "
                       f"{', '.join(f'{w:.0%}' for w in result.weights)}); it is selected, ready to Load.{losses}")
            self._show_new(path)
        else:
            change = ""
            if result.held_out_loss is not None and result.baseline_held_out_loss:
                change = (f" Held-out loss {result.held_out_loss:.3f} with it, "
                          f"{result.baseline_held_out_loss:.3f} without.")
            message = f"Created {path.name}; it is selected in the Soft prompts panel, ready to Load.{change}"
            self._show_new(path)
        if self.tune_dialog is not None:
            self.tune_dialog.finish(message)
        self.window.statusBar().showMessage(message, 10000)

    # -- mixtures -------------------------------------------------------------------------------

    def new_mixture_dialog(self) -> MixtureDialog | None:
        entries = self.window.softprompt_panel.softprompt_entries()
        if not entries:
            self.window.notify("No soft prompts", "A mixture is made of soft prompts that fit the loaded model; "
                                                  "add some first.", error=True)
            return None
        dialog = MixtureDialog(entries, self.window)
        dialog.accepted.connect(lambda: self.save_mixture(dialog.mixture()))
        dialog.open()
        return dialog

    def save_mixture(self, mixture) -> Path | None:
        """Write a mixture into the user's soft prompt folder (a new name, never over a file)."""
        from kobold_desktop.softprompt.mixture import write_mixture

        try:
            path = write_mixture(self.window.library.free_path(mixture.name, ".json"), mixture)
        except KoboldError as exc:
            self.window.notify("Mixture not saved", str(exc), error=True)
            return None
        self._show_new(path)
        self.window.statusBar().showMessage(f"Saved the mixture {path.name}; Load it to write with it.", 10000)
        return path

    def show_learn_dialog(self) -> LearnWeightsDialog | None:
        window = self.window
        entries = window.softprompt_panel.softprompt_entries()
        if window.state.model is None or not entries:
            window.notify("Learn weights", "Load a model and add soft prompts that fit it first.", error=True)
            return None
        window.sync_story()
        if self.learn_dialog is not None:
            self.learn_dialog.close()
        self.learn_dialog = LearnWeightsDialog(entries, window.story.text, window)
        self.learn_dialog.start_requested.connect(self.start_ranking)
        self.learn_dialog.cancel_requested.connect(window.stop)
        self.learn_dialog.save_requested.connect(self.save_mixture)
        self.learn_dialog.show()
        return self.learn_dialog

    def start_ranking(self, request) -> None:
        window = self.window
        if window.state.model is None or window.state.busy:
            self.learn_dialog.finish("Load a model first." if window.state.model is None
                                     else "Wait until the model is free.")
            return
        window.begin_job(Job.RANK)
        window.worker.rank(request)

    def on_rank_progress(self, fraction: float, what: str) -> None:
        if self.learn_dialog is not None:
            self.learn_dialog.show_progress(fraction, what)

    def on_ranked(self, ranking) -> None:
        if self.learn_dialog is not None:
            self.learn_dialog.show_ranking(ranking)

    def on_finished(self, job: str) -> None:
        if job == "tune" and self.tune_dialog is not None:
            self.tune_dialog.set_running(False)
        if job == "rank" and self.learn_dialog is not None:
            self.learn_dialog.set_running(False)

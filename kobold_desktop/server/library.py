"""The soft prompts of the library a server offers: every soft prompt and mixture that fits
the model, each under its name (made unique). `kobold-desktop serve` and the window's
Server ▸ Start both serve these, as KoboldAI serves its softprompts folder."""

from __future__ import annotations

from kobold_desktop.softprompt.library import SoftPromptLibrary


def library_adapters(library: SoftPromptLibrary, hidden_size: int, model_name: str, max_tokens: int,
                     taken: set[str] = frozenset(), mixtures: bool = True) -> dict[str, str]:
    """{name: path} of every entry that fits (its width, its length, its members); names
    already `taken` (the base model's, those given by hand) get " (2)", " (3)"..."""
    adapters: dict[str, str] = {}
    used = set(taken) | {model_name}
    for entry in library.refresh():
        if entry.is_mixture and not mixtures:
            continue
        if not entry.compatibility(hidden_size).ok or not 0 < entry.n_tokens <= max_tokens:
            continue
        name, counter = entry.name, 2
        while name in used:
            name, counter = f"{entry.name} ({counter})", counter + 1
        used.add(name)
        adapters[name] = str(entry.path)
    return adapters

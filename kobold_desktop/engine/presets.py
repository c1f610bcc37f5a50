"""Named sampler settings a writer can pick: KoboldAI Lite's well-known presets, ours, and
the ones the writer saved (kept in the app's settings under `sampler_presets`).

A preset sets the samplers only: the length to write, the seed, the stop sequences and the
banned phrases stay as they are. Values are SamplingSettings' field names; KoboldAI
Lite's presets are given with the values Lite sends for them.
"""

from __future__ import annotations

from typing import Any

from kobold_desktop.engine.sampling import SamplingSettings, SettingsError

# What a preset never changes: they belong to the story or the turn, not to the sampler.
KEPT = ("max_new_tokens", "seed", "stop", "banned_phrases")


def _lite(temperature, top_k, top_p, min_p, rep_pen, rep_pen_range, slope, order, **more) -> dict[str, Any]:
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
            "repetition_penalty": rep_pen, "repetition_penalty_range": rep_pen_range,
            "repetition_penalty_slope": slope, "sampler_order": order, **more}


KOBOLDCPP_ORDER = (6, 0, 1, 3, 4, 2, 5)
TEMPERATURE_FIRST = (6, 5, 0, 1, 3, 4, 2)

BUILT_IN: dict[str, dict[str, Any]] = {
    "Kobold Desktop (default)": {k: v for k, v in SamplingSettings().to_dict().items() if k not in KEPT},
    "Anti-repetition (DRY + XTC)": _lite(1.0, 0, 1.0, 0.05, 1.0, 0, 1.0, TEMPERATURE_FIRST, dry_multiplier=0.8,
                                         dry_base=1.75, dry_allowed_length=2, dry_range=0, xtc_threshold=0.1,
                                         xtc_probability=0.5),
    "Simple Logical (Lite)": _lite(0.3, 100, 0.6, 0.0, 1.02, 360, 0.7, KOBOLDCPP_ORDER),
    "Simple Balanced (Lite)": _lite(0.7, 100, 0.92, 0.0, 1.07, 360, 0.7, KOBOLDCPP_ORDER),
    "Simple Creative (Lite)": _lite(1.0, 100, 0.98, 0.0, 1.15, 360, 0.7, KOBOLDCPP_ORDER),
    "Basic Min-P (Lite)": _lite(1.25, 0, 1.0, 0.1, 1.03, 360, 0.7, TEMPERATURE_FIRST),
    "Basic DynaTemp (Lite)": _lite(1.25, 0, 1.0, 0.05, 1.03, 360, 0.7, TEMPERATURE_FIRST, dynatemp_range=0.75),
    "Basic SmoothSample (Lite)": _lite(1.0, 0, 1.0, 0.05, 1.03, 360, 0.7, TEMPERATURE_FIRST, smoothing_factor=0.25),
    "Basic SillyTavern (Lite)": _lite(0.7, 40, 0.6, 0.0, 1.18, 1024, 0.8, KOBOLDCPP_ORDER),
    "Neutral (all samplers off)": _lite(1.0, 0, 1.0, 0.0, 1.0, 0, 1.0, KOBOLDCPP_ORDER),
}
SETTINGS_KEY = "sampler_presets"


def apply(preset: dict[str, Any], current: SamplingSettings) -> SamplingSettings:
    """`current` with a preset's samplers: every sampler it does not name goes back to its
    default (a preset is a whole sampler setup), what `KEPT` names stays."""
    base = SamplingSettings().to_dict()
    base.update({k: v for k, v in preset.items() if k in base and k not in KEPT})
    base.update({k: v for k, v in current.to_dict().items() if k in KEPT})
    return SamplingSettings.from_dict(base)


def from_settings(settings: SamplingSettings) -> dict[str, Any]:
    """A preset made of these settings (what `KEPT` names left out)."""
    return {k: v for k, v in settings.to_dict().items() if k not in KEPT}


def saved(stored: Any) -> dict[str, dict[str, Any]]:
    """The writer's presets from the app's settings; a damaged one is left out."""
    if not isinstance(stored, dict):
        return {}
    good = {}
    for name, preset in stored.items():
        if isinstance(name, str) and isinstance(preset, dict):
            try:
                apply(preset, SamplingSettings())
            except (SettingsError, TypeError, ValueError):
                continue
            good[name] = preset
    return good

"""App settings: one JSON file in the user config folder, written atomically.

A damaged settings file is set aside (renamed `.bad`) and the app starts with defaults;
it never stops the app from starting.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from kobold_desktop import paths
from kobold_desktop.fileio import atomic_write_bytes


class Settings:
    def __init__(self, path: Path | None = None):
        self.path = path or paths.user_config_dir() / "settings.json"
        self._lock = threading.Lock()
        self._values: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            values = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            values = None
        if not isinstance(values, dict):
            try:
                self.path.replace(self.path.with_name(self.path.name + ".bad"))
            except OSError:
                pass
            return {}
        return values

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value and save at once."""
        with self._lock:
            if value is None:
                self._values.pop(key, None)
            else:
                self._values[key] = value
            data = json.dumps(self._values, indent=1, ensure_ascii=False).encode("utf-8")
            atomic_write_bytes(self.path, data)

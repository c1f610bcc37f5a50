"""Server settings from the command line and/or a YAML file (`--config`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kobold_desktop.errors import KoboldError


BACKENDS = ("local", "vllm")


class ServeConfigError(KoboldError):
    """The server cannot start with these settings."""


@dataclass
class ServeConfig:
    model: str | None = None
    enable_prompt_adapter: bool = True
    prompt_adapters: dict[str, str] = field(default_factory=dict)  # name -> zip, PEFT folder or library name
    # The library's soft prompts that fit (server/library.py): one that fails to load is left
    # out with a warning instead of stopping the server.
    library_adapters: dict[str, str] = field(default_factory=dict)
    max_prompt_adapter_token: int = 512
    max_prompt_adapters: int = 8
    host: str = "127.0.0.1"
    port: int = 2242
    api_key: str | None = None
    admin_key: str | None = None  # for loading/unloading soft prompts (and from any path); defaults to api_key
    allowed_origins: list[str] = field(default_factory=list)  # web pages beyond localhost that may call
    max_batch: int = 16
    backend: str = "local"  # "local" (this machine's model) or "vllm"
    backend_url: str | None = None  # vLLM's OpenAI base; none with backend vllm: start vLLM here
    backend_api_key: str | None = None  # the key vLLM was started with (--api-key), if any
    # Past the context, reuse the cache by moving it (KoboldCpp's ContextShift; close to a
    # fresh read, not exact). Off: trimmed prompts reuse only an unchanged start.
    context_shift: bool = False

    @classmethod
    def from_yaml(cls, path: Path | str) -> "ServeConfig":
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ServeConfigError(f"cannot read the config {path.name}: {exc}") from exc
        if not isinstance(data, dict):
            raise ServeConfigError(f"{path.name} must be a mapping of settings.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ServeConfigError(f"{path.name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        adapters = data.get("prompt_adapters") or {}
        if not isinstance(adapters, dict):
            raise ServeConfigError(f"{path.name}: prompt_adapters must map names to paths.")
        data["prompt_adapters"] = {str(k): str(v) for k, v in adapters.items()}
        origins = data.get("allowed_origins") or []
        if isinstance(origins, str):
            origins = [origins]
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ServeConfigError(f"{path.name}: allowed_origins must be a list of origins like https://lite.koboldai.net.")
        data["allowed_origins"] = [o.rstrip("/") for o in origins]
        config = cls(**data)
        config.check()
        return config

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ServeConfigError(f"backend must be one of {', '.join(BACKENDS)}, not '{self.backend}'.")
        if self.backend_url and self.backend == "local":
            raise ServeConfigError("a backend URL is for a remote backend: add --backend vllm (in a config file, backend: vllm).")

    def merged(self, **overrides: Any) -> "ServeConfig":
        """These settings with every override that is not None applied."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "prompt_adapters":
                values[key] = {**values[key], **value}
            else:
                values[key] = value
        config = ServeConfig(**values)
        config.check()
        return config

    @property
    def admin(self) -> str | None:
        return self.admin_key or self.api_key


def parse_adapter_args(items: list[str] | None) -> dict[str, str]:
    adapters = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ServeConfigError(f"--prompt-adapters takes NAME=PATH, not '{item}'.")
        adapters[name.strip()] = path.strip()
    return adapters

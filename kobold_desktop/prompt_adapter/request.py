"""`PromptAdapterRequest`, with the fields and names of vLLM's and Aphrodite's.

A request names a soft prompt (a KoboldAI zip, a PEFT prompt-tuning adapter, zipped or
not, or an mkultra file) by a name, an id that identifies it across calls, and its path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptAdapterRequest:
    prompt_adapter_name: str
    prompt_adapter_id: int
    prompt_adapter_local_path: str
    # vLLM requires it; Aphrodite's example leaves it out. Read from the file when None,
    # and checked against the file when given.
    prompt_adapter_num_virtual_tokens: int | None = None

    @property
    def name(self) -> str:
        return self.prompt_adapter_name

    @property
    def adapter_id(self) -> int:
        return self.prompt_adapter_id

    @property
    def local_path(self) -> str:
        return self.prompt_adapter_local_path

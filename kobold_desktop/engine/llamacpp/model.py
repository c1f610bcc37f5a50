"""A GGUF file loaded by llama.cpp: the weights, one context, its vocabulary, and the
sequences that share the context's KV cache.

We use llama.cpp's C API through llama-cpp-python's bindings (`llama_cpp.llama_cpp`),
not its high-level `Llama` class: a soft prompt needs a batch of embeddings (rows
`[n, n_embd]` at positions 0..n-1, as llama.cpp #4885 suggested) and the server needs
many sequences in one batch (`seq_id`), neither of which `Llama` offers.

The context's KV cache is unified: every sequence may use up to the whole context, and
cells are shared when one sequence is copied from another (`llama_memory_seq_cp`), so a
story's next turn starts from a copy of the last turn's cells and runs only what is new.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kobold_desktop.engine.errors import ModelError
import kobold_desktop.engine.llamacpp.cpu as cpu
from kobold_desktop.engine.llamacpp.header import is_gguf
from kobold_desktop.engine.prefix_cache import PrefixCache

EXTRA_HINT = ("GGUF models run with llama.cpp, which needs the [gguf] extra: pip install "
              "'kobold-desktop[gguf]' (it compiles llama.cpp; you need CMake and a C++ compiler).")


def library() -> Any:
    """llama-cpp-python's low-level bindings, or a clear error naming the extra."""
    try:
        from llama_cpp import llama_cpp as lib
    except ImportError as exc:
        raise ModelError(EXTRA_HINT) from exc
    except (OSError, RuntimeError) as exc:  # the shared library is there but does not load
        raise ModelError(f"llama.cpp's library failed to load: {exc}. Reinstall the [gguf] extra.") from exc
    _init(lib)
    return lib


_init_lock = threading.Lock()
_cpu: cpu.CpuBackend | None = None


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's log goes nowhere unless KOBOLD_LLAMA_LOG is set (it is very chatty)."""
    if os.environ.get("KOBOLD_LLAMA_LOG"):
        os.write(2, text or b"")


def _init(lib: Any) -> None:
    global _cpu
    with _init_lock:
        if _cpu is None:
            lib.llama_log_set(_quiet, ctypes.c_void_p(0))
            backend = cpu.load(lib)
            lib.llama_backend_init()
            _cpu = backend


def cpu_backend() -> cpu.CpuBackend:
    """The CPU code llama.cpp runs with in this process (loads llama.cpp if need be)."""
    library()
    assert _cpu is not None
    return _cpu


@dataclass(frozen=True)
class GgufOptions:
    threads: int | None = None  # CPU threads; None: the physical cores
    context: int | None = None  # tokens per sequence; None: the model's, at most 4096
    gpu_layers: int | None = None  # layers on the GPU; None: all when the build has a GPU
    sequences: int = 8  # sequences generating at once (server rows, mixture members)
    stored: int = 8  # finished sequences kept for reuse


DEFAULT_CONTEXT = 4096
# Flash attention: llama.cpp's "auto" (-1) turns it on, which on a CPU made each token at
# a 1,500-token story 4x slower here (0.10 s against 0.025 s, benchmarks/gguf_speed.py); on a
# GPU it saves memory and time. So: auto where layers are offloaded, off on the CPU.
FLASH_ATTN_AUTO, FLASH_ATTN_OFF = -1, 0


def weight_type(desc: str) -> str:
    """The weight type in llama.cpp's model description ("llama 135M Q4_K - Medium"), named
    as GGUF files are ("Q4_K_M")."""
    parts = desc.split(" ", 2)
    name = parts[2] if len(parts) == 3 else desc
    name = name.removeprefix("all ")  # "all F32": no tensor quantized
    return re.sub(r" - ([A-Za-z])[a-z]*$", lambda m: "_" + m.group(1).upper(), name)


def default_threads() -> int:
    count = os.cpu_count() or 1
    return max(1, count // 2) if count >= 8 else count


@dataclass
class SeqHandle:
    """A prefix of a llama.cpp sequence: the cache object of a prefix cache entry."""

    seq_id: int
    n: int


class _SeqOps:
    """How the prefix cache measures and cuts llama.cpp sequences (its `nbytes` is in
    positions: the store is bounded in KV cells)."""

    @staticmethod
    def is_joinable(handle: Any) -> bool:
        return isinstance(handle, SeqHandle)

    @staticmethod
    def length(handle: SeqHandle) -> int:
        return handle.n

    @staticmethod
    def nbytes(handle: SeqHandle) -> int:
        return handle.n

    @staticmethod
    def prefix(handle: SeqHandle, n: int) -> SeqHandle:
        return SeqHandle(handle.seq_id, n)


class GgufModel:
    """The llama.cpp model and context. Not thread-safe: the engine's lock guards it."""


    def __init__(self, path: str | Path, options: GgufOptions = GgufOptions()):
        lib = self.lib = library()
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ModelError(f"no GGUF file at '{path}'.")
        if not is_gguf(self.path):
            raise ModelError(f"'{self.path.name}' is not a GGUF file (it does not start with 'GGUF').")
        mparams = lib.llama_model_default_params()
        self.cpu = cpu_backend()
        if self.cpu.extra_buffers_off or os.environ.get(cpu.EXTRA_BUFFERS_ENV) == "0":
            mparams.use_extra_bufts = False  # a build carrying AMX, whose buffer type crashes (cpu.py)
        gpu = lib.llama_supports_gpu_offload()
        mparams.n_gpu_layers = options.gpu_layers if options.gpu_layers is not None else (999 if gpu else 0)
        self.gpu_layers = mparams.n_gpu_layers if gpu else 0
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise ModelError(f"llama.cpp could not load '{self.path.name}' (a damaged file, or an architecture "
                             "this build of llama.cpp does not know; set KOBOLD_LLAMA_LOG=1 to see why).")
        self._ctx = None
        try:
            self.vocab = lib.llama_model_get_vocab(self._model)
            self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
            self.hidden_size = int(lib.llama_model_n_embd_inp(self._model))
            self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
            self.sliding = int(lib.llama_model_n_swa(self._model)) > 0
            self.name = self.meta("general.name") or self.path.stem
            desc = ctypes.create_string_buffer(256)
            lib.llama_model_desc(self._model, desc, len(desc))
            self.precision = weight_type(desc.value.decode(errors="replace")) if desc.value else "GGUF"
            self.architecture = self.meta("general.architecture") or "unknown"
            wanted = options.context or min(self.n_ctx_train or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
            self.context_length = min(wanted, self.n_ctx_train) if self.n_ctx_train else wanted
            self.threads = options.threads or default_threads()
            self.n_seq = max(2, options.sequences + options.stored)
            # KV cells: one sequence at full length plus as much again for the others and
            # the finished ones kept for reuse.
            self.cells = self.context_length * 2
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = self.cells
            cparams.n_batch = cparams.n_ubatch = min(512, self.cells)
            cparams.n_seq_max = self.n_seq
            cparams.n_threads = cparams.n_threads_batch = self.threads
            cparams.kv_unified = True
            cparams.no_perf = True
            cparams.flash_attn_type = FLASH_ATTN_AUTO if self.gpu_layers else FLASH_ATTN_OFF
            self.n_batch = int(cparams.n_batch)
            self._ctx = lib.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise ModelError(f"llama.cpp could not make a context of {self.cells} tokens for "
                                 f"'{self.path.name}' (out of memory? choose a smaller context).")
            self.memory = lib.llama_get_memory(self._ctx)
            self._tokens = lib.llama_batch_init(self.n_batch, 0, 1)
            self._embeds = lib.llama_batch_init(self.n_batch, self.hidden_size, 1)
        except BaseException:
            self.close()
            raise
        self.eog = {t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(self.vocab, t)}
        self.reserved = 0  # cells promised to running sequences
        self._free = list(range(self.n_seq - 1, -1, -1))
        self.prefix_cache = PrefixCache(self.cells, max(1, options.stored), ops=_SeqOps,
                                        on_evict=lambda handle: self.release(handle.seq_id))
        self.tokens_decoded = 0  # positions run through the model (tests and benchmarks count them)
        self.running: dict[int, Any] = {}  # seq_id -> the row generating in it (every core's)

    # -- metadata ------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self.lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # a long value (a chat template): ask again with room for it
            buf = ctypes.create_string_buffer(n + 1)
            self.lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    # -- vocabulary ----------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        while True:
            out = (ctypes.c_int32 * room)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), out, room, add_special, True)
            if n >= 0:
                return list(out[:n])
            room = -n

    def detokenize(self, ids: Sequence[int], unparse_special: bool = False) -> str:
        if not ids:
            return ""
        tokens = (ctypes.c_int32 * len(ids))(*ids)
        room = 16 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(room)
            n = self.lib.llama_detokenize(self.vocab, tokens, len(ids), buf, room, False, unparse_special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            room = -n

    def token_text(self, token: int) -> str:
        raw = self.lib.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    # -- sequences -----------------------------------------------------------------------

    def allocate(self) -> int:
        """A free sequence id, dropping the oldest stored sequence when none is free."""
        while not self._free:
            if not self.prefix_cache.evict_oldest():
                raise ModelError(f"all {self.n_seq} llama.cpp sequences are in use; wait for one to finish.")
        seq_id = self._free.pop()
        self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        return seq_id

    @property
    def free_sequences(self) -> int:
        """Sequence ids free now or held only by stored entries (which can be dropped)."""
        return len(self._free) + len(self.prefix_cache)

    def release(self, seq_id: int) -> None:
        """Free a sequence's cells (those another sequence shares stay) and its id."""
        if self._ctx is not None:
            self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        if seq_id not in self._free:
            self._free.append(seq_id)

    def copy(self, src: int, dst: int, n: int) -> None:
        """Let `dst` start with `src`'s first n positions (shared cells, nothing copied)."""
        self.lib.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def shift_refusal(self) -> str | None:
        """Why llama.cpp cannot move this model's cached positions, or None."""
        if self.sliding:
            return "context shift does not support sliding-window attention"
        if not self.lib.llama_memory_can_shift(self.memory):
            return f"llama.cpp cannot shift the cache of this {self.architecture} model"
        return None

    def shift(self, seq_id: int, keep: int, start: int, length: int) -> None:
        """Context shift in one sequence: keep its first `keep` positions, drop keep..start
        and everything after start+length, and move start..start+length back to keep..
        (llama.cpp turns the moved keys at the next decode). The cells must be this
        sequence's alone: moving a cell moves it for every sequence sharing it."""
        lib = self.lib
        lib.llama_memory_seq_rm(self.memory, seq_id, start + length, -1)
        lib.llama_memory_seq_rm(self.memory, seq_id, keep, start)
        lib.llama_memory_seq_add(self.memory, seq_id, start, start + length, keep - start)

    def make_room(self, need: int) -> bool:
        """Drop stored sequences until `need` more cells fit beside the running ones."""
        while self.reserved + need + self.prefix_cache.nbytes > self.cells:
            if not self.prefix_cache.evict_oldest():
                break
        return self.reserved + need <= self.cells

    # -- running the model ---------------------------------------------------------------

    def _decode(self, batch: Any, n: int) -> None:
        batch.n_tokens = n
        code = self.lib.llama_decode(self._ctx, batch)
        if code == 1:  # no room in the KV cache: drop every stored sequence and try again
            self.prefix_cache.clear()
            code = self.lib.llama_decode(self._ctx, batch)
        if code != 0:
            raise ModelError(f"llama.cpp failed to run the model (llama_decode returned {code}).")
        self.tokens_decoded += n

    def _outputs(self, n_out: int) -> np.ndarray:
        """The logits of the last decode's outputs, [n_out, vocab], copied."""
        ptr = self.lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()

    def decode_tokens(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int],
                      outputs: Sequence[bool]) -> np.ndarray:
        """Run one batch of tokens (at most n_batch); the logits of those marked in `outputs`."""
        batch = self._tokens
        for i, (token, pos, seq, out) in enumerate(zip(tokens, positions, seq_ids, outputs)):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = out
        self._decode(batch, len(tokens))
        return self._outputs(sum(bool(o) for o in outputs))

    def decode_embeds(self, rows: np.ndarray, first: int, seq_id: int, outputs: Sequence[bool]) -> np.ndarray:
        """Run rows of input embeddings ([n, hidden] float32, n at most n_batch) at positions
        first.. of one sequence."""
        batch = self._embeds
        n = rows.shape[0]
        data = np.ascontiguousarray(rows, dtype=np.float32)
        ctypes.memmove(batch.embd, data.ctypes.data, data.nbytes)
        for i in range(n):
            batch.pos[i] = first + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = outputs[i]
        self._decode(batch, n)
        return self._outputs(sum(bool(o) for o in outputs))

    # -- the end -------------------------------------------------------------------------

    def close(self) -> None:
        lib = self.lib
        for name in ("_tokens", "_embeds"):
            batch = self.__dict__.pop(name, None)
            if batch is not None:
                lib.llama_batch_free(batch)
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # noqa: D105 - free the C memory if close() was never called
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the library may be gone
            pass


class GgufTokenizer:
    """The tokenizer of a GGUF file, shaped like the parts of a transformers tokenizer
    that the app uses (call, decode, len, eos/bos ids, a chat template)."""

    def __init__(self, model: GgufModel):
        self._model = model
        lib, vocab = model.lib, model.vocab
        self.bos_token_id = _token_or_none(lib.llama_vocab_bos(vocab))
        eos = _token_or_none(lib.llama_vocab_eos(vocab))
        self.eos_token_id = sorted(model.eog) if model.eog else eos
        self.bos_token = model.token_text(self.bos_token_id) if self.bos_token_id is not None else ""
        self.eos_token = model.token_text(eos) if eos is not None else ""
        self.chat_template = model.meta("tokenizer.chat_template")

    def __len__(self) -> int:
        return self._model.n_vocab

    def get_vocab(self) -> dict[str, int]:
        """Each token's text (as the file stores it: byte-level or SentencePiece pieces) and id."""
        return {self._model.token_text(i): i for i in range(self._model.n_vocab)}

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self._model.tokenize(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._model.tokenize(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, **_: Any) -> str:
        return self._model.detokenize([int(i) for i in ids], unparse_special=not skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **_: Any) -> str | list[int]:
        """Render the GGUF's Jinja chat template the way transformers does (a sandboxed
        environment, `raise_exception`, the BOS and EOS strings)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_or_none(token: int) -> int | None:
    return None if token is None or token < 0 else int(token)

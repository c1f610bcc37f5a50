"""`kobold-desktop model convert`: a transformers model folder to a GGUF file.

The conversion itself is llama.cpp's own `convert_hf_to_gguf.py` (with its `conversion/`
package and `gguf-py`), the one converter that knows every architecture llama.cpp runs.
It ships in llama-cpp-python's source distribution, not in its wheel, so
`get_converter` takes it from there (`pip download`, the version that is installed, so
the files it writes are the ones this llama.cpp reads). A llama.cpp checkout works too.

Two things are added around it:
- A byte-level BPE tokenizer with GPT-2's split pattern (such as the demo model's, or
  any tokenizer trained with the `tokenizers` library's defaults) is recognised from its
  `tokenizer.json`; the converter recognises pre-tokenizers only by hashing the ids of a
  test string, so it refuses every vocabulary it has not seen.
- Quantized types that the converter cannot write (q4_K_M, q5_K_M, q6_K, q4_0, ...) are
  made with llama.cpp's quantizer from an f32 conversion, in-process.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from kobold_desktop import paths
from kobold_desktop.engine.errors import ModelError

CONVERTER = "convert_hf_to_gguf.py"
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")  # what the converter writes itself
QUANTIZED_TYPES = {  # llama_ftype values of llama.h
    "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14,
    "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
}
TYPES = DIRECT_TYPES + tuple(QUANTIZED_TYPES)
ENV = "KOBOLD_LLAMA_CPP"


def converter_dirs(explicit: str | Path | None = None) -> list[Path]:
    """Where a converter is looked for, in order."""
    found = [Path(explicit).expanduser()] if explicit else []
    if os.environ.get(ENV):
        found.append(Path(os.environ[ENV]).expanduser())
    found += [Path(sys.prefix) / "share" / "kobold-desktop" / "llama.cpp", paths.user_data_dir() / "llama.cpp"]
    return found


def find_converter(explicit: str | Path | None = None) -> Path:
    """The folder holding convert_hf_to_gguf.py, or a clear error saying how to get one."""
    for folder in converter_dirs(explicit):
        if (folder / CONVERTER).is_file():
            return folder
    if explicit:
        raise ModelError(f"'{explicit}' has no {CONVERTER} (give a llama.cpp checkout).")
    raise ModelError(f"llama.cpp's converter is not here yet; run `kobold-desktop model get-converter` "
                     f"(it downloads llama-cpp-python's source from PyPI), or give a llama.cpp checkout with "
                     f"--llama-cpp DIR or ${ENV}.")


def installed_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception as exc:  # noqa: BLE001 - PackageNotFoundError and friends
        from kobold_desktop.engine.llamacpp.model import EXTRA_HINT

        raise ModelError(EXTRA_HINT) from exc


def get_converter(dest: str | Path | None = None, sdist: str | Path | None = None) -> Path:
    """Put the converter of the installed llama-cpp-python into `dest` (by default the
    first place `find_converter` looks that we may write to). `sdist` is a source archive
    already at hand; otherwise pip downloads it."""
    version = installed_version()
    dest = Path(dest) if dest else Path(sys.prefix) / "share" / "kobold-desktop" / "llama.cpp"
    if not os.access(dest.parent if dest.parent.exists() else Path(sys.prefix), os.W_OK):
        dest = paths.user_data_dir() / "llama.cpp"
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   f"llama-cpp-python=={version}", "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if done.returncode != 0 or not archives:
                raise ModelError(f"pip could not download llama-cpp-python {version}'s source: "
                                 f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            sdist = archives[0]
        _extract(Path(sdist), dest)
    return dest


def _extract(sdist: Path, dest: Path) -> None:
    wanted = (CONVERTER, "conversion/", "gguf-py/gguf/", "LICENSE")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/vendor/llama.cpp/", 1)
            if len(parts) != 2 or not member.isfile() or not parts[1].startswith(wanted):
                continue
            target = dest / parts[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src:
                target.write_bytes(src.read())
    if not (dest / CONVERTER).is_file():
        raise ModelError(f"'{sdist.name}' has no vendor/llama.cpp/{CONVERTER}.")


def gpt2_style_pre_tokenizer(model_dir: Path) -> str | None:
    """"gpt-2" when tokenizer.json splits text the way GPT-2 does (ByteLevel with its
    regex, nothing else), which llama.cpp implements as the "gpt-2" pre-tokenizer."""
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("model", {}).get("type") != "BPE" or spec.get("normalizer"):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    return None


_RUNNER = r"""
import sys
from pathlib import Path
folder = Path(sys.argv[1])
sys.path[:0] = [str(folder), str(folder / "gguf-py")]
import conversion.base as base
from kobold_desktop.engine.llamacpp.convert import gpt2_style_pre_tokenizer
original = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        pre = gpt2_style_pre_tokenizer(Path(self.dir_model))
        if pre is None:
            raise
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
convert_hf_to_gguf.main()
"""


def convert(model_dir: str | Path, out: str | Path, outtype: str = "f16", llama_cpp: str | Path | None = None,
            log=None) -> Path:
    """Convert a transformers model folder to a GGUF file of `outtype`. Never overwrites
    `out`; a failed conversion leaves nothing behind."""
    if getattr(sys, "frozen", False):  # the converter is a Python script: it needs a Python
        raise ModelError("model convert runs from a Python install (pip install 'kobold-desktop[gguf]'), "
                         "not from the bundle; the bundle loads the GGUF files it writes.")
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    outtype = outtype.lower()
    if outtype not in TYPES:
        raise ModelError(f"unknown type '{outtype}'; choose one of {', '.join(TYPES)}.")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"'{model_dir}' is not a transformers model folder (it has no config.json).")
    if out.exists():
        raise ModelError(f"'{out}' exists; choose another name (nothing is overwritten).")
    folder = find_converter(llama_cpp)
    out.parent.mkdir(parents=True, exist_ok=True)
    direct = outtype if outtype in DIRECT_TYPES else "f32"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        first = Path(tmp) / f"model-{direct}.gguf"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        done = subprocess.run([sys.executable, "-c", _RUNNER, str(folder), str(model_dir), "--outfile", str(first),
                               "--outtype", direct], capture_output=True, text=True, env=env)
        if log is not None:
            log(done.stderr)
        if done.returncode != 0 or not first.is_file():
            lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
            raise ModelError(f"llama.cpp's converter failed on '{model_dir.name}': "
                             f"{lines[-1] if lines else 'no output'}")
        result = first
        if outtype in QUANTIZED_TYPES:
            result = Path(tmp) / f"model-{outtype}.gguf"
            quantize(first, result, outtype)
        os.replace(result, out)
    return out


def quantize(src: str | Path, dst: str | Path, outtype: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer, in-process."""
    from kobold_desktop.engine.llamacpp.model import library

    lib = library()
    params = lib.llama_model_quantize_default_params()
    params.ftype = QUANTIZED_TYPES[outtype]
    params.nthread = threads or (os.cpu_count() or 1)
    code = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if code != 0:
        raise ModelError(f"llama.cpp could not quantize to {outtype} (code {code}).")

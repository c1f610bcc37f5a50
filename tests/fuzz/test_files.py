"""Fuzzing every file format we read: valid files of each format, mutated at the byte level
(flips, overwrites, truncation, insertions, copied slices) and at the field level (zip
header fields; any value of a JSON document replaced by a hostile one: huge or deep
numbers, lone surrogates, wrong types, deep nesting).

The one property: the loader accepts the file (and then what it returns is sound: a finite
2-D float tensor of the shape it describes, a story that saves) or raises our typed error.
Never another library's exception, never a hang, never unbounded memory (the loaders run
under an address-space limit in `test_memory.py`).

`make test` runs KOBOLD_FUZZ_EXAMPLES (default 30) cases per format; `make fuzz` runs
10,000 per format and prints how many were accepted and refused.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kobold_desktop.errors import KoboldError
from kobold_desktop.softprompt import describe_softprompt, load_softprompt
from kobold_desktop.softprompt.errors import SoftPromptError
from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, read_mixture, write_mixture
from kobold_desktop.softprompt.types import Metadata
from kobold_desktop.story.files import read_story, read_world_info, save_story

from ..softprompt.builders import mkultra_json, npy_bytes, random_tensor, softprompt_zip

EXAMPLES = int(os.environ.get("KOBOLD_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=list(HealthCheck))
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


# -- mutations --------------------------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "copy"]), st.integers(0, 1 << 30),
                         st.binary(min_size=1, max_size=16)), min_size=1, max_size=6)


def mutate_bytes(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, at, chunk in ops:
        if not out:
            out = bytearray(chunk)
            continue
        i = at % len(out)
        if op == "flip":
            out[i] ^= 1 << (chunk[0] % 8)
        elif op == "set":
            out[i:i + len(chunk)] = chunk
        elif op == "cut":
            del out[i:]
        elif op == "insert":
            out[i:i] = chunk
        else:
            j = (at >> 7) % len(out)
            out[i:i] = out[j:j + 64]
    return bytes(out)


HOSTILE_VALUES = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([None, True, False, "", "\ud800", "x" * 10_000, [], {}, -1, 0, 1, 2 ** 63, 1e308, 4.9e-324]),
    st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
RAW_TOKENS = st.sampled_from(["1" * 5000, "1e999", "-1e999", "NaN", "Infinity", "[" * 500 + "]" * 500,
                              '"\\ud800"', '"\\udfff x"', "123456789012345678901234567890"])


def json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            yield from json_paths(item, prefix + (index,))


def mutate_json(document, data: st.DataObject) -> str:
    paths = list(json_paths(document))
    path = data.draw(st.sampled_from(paths))
    marker = "__FUZZ_RAW__"
    use_raw = data.draw(st.booleans())
    replacement = marker if use_raw else data.draw(HOSTILE_VALUES)
    if not path:
        document = replacement
    else:
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = replacement
    text = json.dumps(document)
    return text.replace(f'"{marker}"', data.draw(RAW_TOKENS)) if use_raw else text


ZIP_FIELDS = {"version": (4, 2, 6, 2), "flags": (6, 2, 8, 2), "method": (8, 2, 10, 2), "crc": (14, 4, 16, 4),
              "compressed": (18, 4, 20, 4), "size": (22, 4, 24, 4), "name length": (26, 2, 28, 2)}


def mutate_zip_field(data: bytes, field: str, value: int, which: int) -> bytes:
    out = bytearray(data)
    local_at, size, central_at, _ = ZIP_FIELDS[field]
    for signature, offset in ((b"PK\x03\x04", local_at), (b"PK\x01\x02", central_at)):
        at = -1
        for _ in range(which + 1):
            at = out.find(signature, at + 1)
        if at >= 0 and at + offset + size <= len(out):
            out[at + offset:at + offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    return bytes(out)


# -- properties -------------------------------------------------------------------------

class Unraisable:
    """Errors Python reports but cannot raise (in a destructor: a buffer freed while still
    exported, a use after free in waiting): a loader that causes one fails the case."""

    def __enter__(self):
        self.seen, self.previous = [], sys.unraisablehook
        sys.unraisablehook = lambda unraisable: self.seen.append(f"{unraisable.exc_type.__name__}: "
                                                                 f"{unraisable.exc_value}")
        return self

    def __exit__(self, *exc):
        sys.unraisablehook = self.previous
        if self.seen and exc[0] is None:
            raise AssertionError(f"unraisable errors while loading: {self.seen}")


def check_softprompt(fmt: str, path: Path) -> None:
    try:
        with Unraisable():
            described = describe_softprompt(path)
            softprompt, tensor = load_softprompt(path)
    except SoftPromptError as exc:
        assert str(exc).startswith(path.name) or exc.path is not None
        COUNTS[fmt]["refused"] += 1
        return
    except Exception:
        COUNTS[fmt]["defect"] += 1
        raise
    assert tensor.dtype in (torch.float16, torch.bfloat16, torch.float32) and tensor.dim() == 2
    assert tuple(tensor.shape) == (softprompt.n_tokens, softprompt.hidden_size)
    assert (described.n_tokens, described.hidden_size) == (softprompt.n_tokens, softprompt.hidden_size)
    assert bool(torch.isfinite(tensor).all())
    COUNTS[fmt]["accepted"] += 1


def check_story(fmt: str, path: Path, reader) -> None:
    try:
        result = reader(path)
    except KoboldError:
        COUNTS[fmt]["refused"] += 1
        return
    except Exception:
        COUNTS[fmt]["defect"] += 1
        raise
    if fmt.startswith("story"):
        save_story(result.story, path.with_suffix(".saved.json"))  # what loads also saves
        read_story(path.with_suffix(".saved.json"))
    COUNTS[fmt]["accepted"] += 1


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """One valid file of each format, as bytes (folders as their files)."""
    from kobold_desktop.softprompt import peft_dir

    root = tmp_path_factory.mktemp("seeds")
    tensor = random_tensor(6, 16)
    out = {
        "koboldai-zip-lzma": softprompt_zip(root / "a.zip", tensor, {"name": "A", "author": ["x"]}).read_bytes(),
        "koboldai-zip-deflate": softprompt_zip(root / "b.zip", tensor.half(), {"name": "B"}, "deflate").read_bytes(),
        "koboldai-zip-stored": softprompt_zip(root / "c.zip", tensor.bfloat16(), None, "stored").read_bytes(),
        "mkultra": mkultra_json(root / "m.json", tensor[None]).read_bytes(),
    }
    peft_dir.write(root / "peft", tensor, Metadata(name="P"))
    out["peft-config"] = (root / "peft" / "adapter_config.json").read_bytes()
    out["peft-safetensors"] = (root / "peft" / "adapter_model.safetensors").read_bytes()
    buffer = io.BytesIO()
    torch.save({"prompt_embeddings": tensor}, buffer)
    out["peft-bin"] = buffer.getvalue()
    shutil.make_archive(str(root / "peft-zipped"), "zip", root, "peft")
    out["peft-zip"] = (root / "peft-zipped.zip").read_bytes()
    write_mixture(root / "mix.json", Mixture("Mix", "bayes", (MixtureMember("a.zip", 0.5), MixtureMember("b.zip", 1.5))))
    out["mixture"] = (root / "mix.json").read_bytes()
    from kobold_desktop.story.document import Action, Story, WorldInfoEntry

    save_story(Story(title="T", prompt="Once", actions=[Action(" upon", "model"), Action(" a time", "user")],
                     memory="m", world_info=[WorldInfoEntry(keys=["k"], content="c")]), root / "story.json")
    out["story-ours"] = (root / "story.json").read_bytes()
    out["story-koboldai"] = json.dumps({"gamestarted": True, "prompt": "Once", "memory": "", "authorsnote": "",
                                        "actions": [" upon", " a time"], "worldinfo": [
                                            {"key": "dragon, wyrm", "content": "A dragon.", "comment": ""}]}).encode()
    out["world-info-sillytavern"] = json.dumps({"entries": {"0": {"key": ["sword"], "content": "A blade.",
                                                                  "comment": "Sword", "disable": False}}}).encode()
    return out


def _peft_folder(tmp: Path, seeds: dict, replace: str, data: bytes) -> Path:
    folder = tmp / "adapter"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(seeds["peft-config"])
    weights = "adapter_model.bin" if replace == "peft-bin" else "adapter_model.safetensors"
    (folder / weights).write_bytes(seeds["peft-bin" if replace == "peft-bin" else "peft-safetensors"])
    (folder / ("adapter_config.json" if replace == "peft-config" else weights)).write_bytes(data)
    return folder


SOFTPROMPT_BYTES = ["koboldai-zip-lzma", "koboldai-zip-deflate", "koboldai-zip-stored", "mkultra", "peft-zip"]


@pytest.mark.parametrize("fmt", SOFTPROMPT_BYTES)
def test_softprompt_files_mutated_byte_by_byte(fmt, seeds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(fmt)
    suffix = ".json" if fmt == "mkultra" else ".zip"

    @FUZZ
    @given(ops=OPS)
    def run(ops):
        path = tmp / f"fuzzed{suffix}"
        path.write_bytes(mutate_bytes(seeds[fmt], ops))
        check_softprompt(fmt, path)

    run()


@pytest.mark.parametrize("fmt", ["koboldai-zip-lzma", "koboldai-zip-deflate", "peft-zip"])
def test_zip_header_fields(fmt, seeds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(fmt + "-fields")

    @FUZZ
    @given(field=st.sampled_from(sorted(ZIP_FIELDS)), value=st.integers(0, 1 << 32), which=st.integers(0, 2))
    def run(field, value, which):
        path = tmp / "fuzzed.zip"
        path.write_bytes(mutate_zip_field(seeds[fmt], field, value, which))
        check_softprompt(fmt + " header fields", path)

    run()


@pytest.mark.parametrize("part", ["peft-config", "peft-safetensors", "peft-bin"])
def test_peft_folders_mutated(part, seeds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(part)

    @FUZZ
    @given(ops=OPS)
    def run(ops):
        check_softprompt(part, _peft_folder(tmp, seeds, part, mutate_bytes(seeds[part], ops)))

    run()


@pytest.mark.parametrize("fmt", ["peft-config", "mkultra", "koboldai-meta"])
def test_json_fields_replaced_with_hostile_values(fmt, seeds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(fmt + "-json")
    base = {"name": "A", "author": ["x"], "description": "d", "supported": ["m"]} if fmt == "koboldai-meta" \
        else json.loads(seeds[fmt])

    @FUZZ
    @given(data=st.data())
    def run(data):
        text = mutate_json(json.loads(json.dumps(base)), data)
        if fmt == "peft-config":
            path = _peft_folder(tmp, seeds, "peft-config", text.encode("utf-8", "surrogatepass"))
        elif fmt == "mkultra":
            path = tmp / "fuzzed.json"
            path.write_bytes(text.encode("utf-8", "surrogatepass"))
        else:
            path = tmp / "fuzzed.zip"
            with zipfile.ZipFile(path, "w") as zf:
                zf.writestr("tensor.npy", npy_bytes(random_tensor(3, 8).numpy()))
                zf.writestr("meta.json", text.encode("utf-8", "surrogatepass"))
        check_softprompt(fmt + " fields", path)

    run()


@pytest.mark.parametrize("fmt", ["mixture", "story-ours", "story-koboldai", "world-info-sillytavern"])
def test_json_documents_mutated(fmt, seeds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(fmt)
    reader = {"mixture": read_mixture, "world-info-sillytavern": read_world_info}.get(fmt, read_story)

    @FUZZ
    @given(data=st.data(), bytewise=st.booleans())
    def run(data, bytewise):
        if bytewise:
            raw = mutate_bytes(seeds[fmt], data.draw(OPS))
        else:
            raw = mutate_json(json.loads(seeds[fmt]), data).encode("utf-8", "surrogatepass")
        path = tmp / "fuzzed.json"
        path.write_bytes(raw)
        check_story(fmt, path, reader)

    run()

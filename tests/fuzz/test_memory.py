"""Tiny files that ask for gigabytes: refused before the memory is taken. Run in a child
process under an address-space limit (512 MiB above what it holds once warmed up), whose peak resident
memory (ru_maxrss) is compared before and after the loads; each refusal must be the byte
budget's, not a failed allocation."""

import json
import subprocess
import sys

from ..softprompt.test_hostile import mkultra_view

CHILD = r"""
import json, resource, sys
from kobold_desktop.softprompt import load_softprompt, describe_softprompt
from kobold_desktop.softprompt.errors import SoftPromptError
for path in sys.argv[1:3]:  # valid files first: torch's lazy start-up (threads, allocator) is not the test
    load_softprompt(path)
# Under a memory limit: 512 MiB more address space than the process has now.
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), resource.RLIM_INFINITY))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = []
for path in sys.argv[3:]:
    for call in (describe_softprompt, load_softprompt):
        try:
            call(path)
            outcomes.append("accepted")
        except SoftPromptError as exc:
            outcomes.append(str(exc))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_mib": (after - before) / 1024, "outcomes": outcomes}))
"""


def test_hostile_files_cost_no_memory(tmp_path):
    from .test_files import npy_bytes  # noqa: F401 - the builders, imported the same way
    from ..softprompt.builders import make_zip
    import torch

    zero_stride = mkultra_view(tmp_path / "stride.json", 4, 0, (2047, 65536), (0, 0))  # 512 MiB once copied
    header = npy_bytes(torch.zeros(1, 1, dtype=torch.float64).numpy()).replace(b"(1, 1)", b"(2047, 65536)")
    honest = make_zip(tmp_path / "honest.zip", header, compression="deflate")  # 1 GiB of float64 declared
    from ..softprompt.builders import mkultra_json, random_tensor, softprompt_zip

    valid = [mkultra_json(tmp_path / "ok.json", random_tensor()), softprompt_zip(tmp_path / "ok.zip")]
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, valid), str(zero_stride), str(honest)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert all("MiB of memory" in outcome or "dimension" in outcome for outcome in result["outcomes"]), result
    assert result["grew_mib"] < 100, result

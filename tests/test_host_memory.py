"""CPU allocator setting of training runs (``--cpu_reuse_memory``): freed memory is reused, not page-faulted again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xcft.train.args import parse_train_args

PROBE = r"""
import resource, sys, torch
if sys.argv[1] == "reuse":
    from xcft.train.host_memory import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = faults()
for _ in range(10):  # a training step's pattern: large tensors made, used and freed every step
    logits = torch.ones(400, 92544)
    grad = logits * 2
    del logits, grad
print(faults() - start)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting (Linux only)")
@pytest.mark.slow
def test_keep_freed_memory_avoids_page_faulting_each_step_again():
    default, reuse = _faults("default"), _faults("reuse")
    pages_per_step = 2 * 400 * 92544 * 4 // 4096
    assert default > 5 * pages_per_step  # by default every step maps its large tensors afresh
    assert reuse < default / 2, (default, reuse)


def test_cpu_reuse_memory_flag(tmp_path):
    base = ["--model_name_or_path", str(tmp_path), "--data_path", str(tmp_path / "d.txt"), "--output_dir", str(tmp_path / "o")]
    assert parse_train_args(base).model.cpu_reuse_memory is True
    assert parse_train_args([*base, "--cpu_reuse_memory", "false"]).model.cpu_reuse_memory is False

"""The fuzz runner's report of a failed target: what a CI log must keep to reproduce it.

A clean clone's build/ directory does not survive its CI run, and the end of a target's
log is the sanitizer's stack: the runner prints the Python exception and the failing
input itself. Plain functions of fuzz/run.py on a log as libFuzzer writes it; no fuzzing.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from fuzz import run

LOG = """INFO: Seed: 1
#228\tNEW    cov: 548 ft: 1731 corp: 42/9Kb exec/s: 19
 === Uncaught Python exception: ===
AssertionError: the compiled fast path (mode True) and the Python session differ:
  to_client: first difference at byte 12
Traceback (most recent call last):
  File "fuzz/target_fastpath.py", line 400, in test_one_input
==1234== ERROR: libFuzzer: fuzz target exited
    #0 0x7f in __sanitizer_print_stack_trace
SUMMARY: libFuzzer: fuzz target exited
MS: 1 ChangeBinInt-; base unit: f860046595c308e80c83a236206681f5d95cbc10
artifact_prefix='x/'; Test unit written to {artifact}
stat::number_of_executed_units: 228
stat::average_exec_per_sec:     19
"""


def test_a_failure_is_reported_with_its_exception_and_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifact = tmp_path / "crash-1"
    artifact.write_bytes(b"\x00\x01input that failed\xff")
    log = LOG.format(artifact=artifact)
    result = run.parse("fastpath", log, 1, 14.3)
    assert not result.ok and result.runs == 228 and result.per_second == 19
    assert result.problem == "Uncaught Python exception" and result.artifact == str(artifact)
    run.report_failure(log, result.artifact)
    out = capsys.readouterr().out
    assert "AssertionError: the compiled fast path" in out
    assert 'File "fuzz/target_fastpath.py", line 400' in out
    assert "__sanitizer_print_stack_trace" not in out  # the exception only, not the stack
    encoded = out.split("base64 -d > FILE):\n", 1)[1].split()[0]
    assert base64.b64decode(encoded) == artifact.read_bytes()


def test_a_clean_run_is_ok() -> None:
    log = ("#1000\tDONE   cov: 88 ft: 469 corp: 195/3Kb exec/s: 21638\n"
           "Done 454416 runs in 21 second(s)\n")
    result = run.parse("fast_shape", log, 0, 21.4)
    assert result.ok and result.runs == 454416 and result.cov == 88

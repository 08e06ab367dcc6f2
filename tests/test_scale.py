"""Data-parallel operators: 4 forced CPU devices and two jax.distributed processes give the
eigenvalues of one device (subprocesses, since the device count is fixed at JAX start-up)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("scale_worker.py")


def _env(num_devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _parse(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[-1][len("RESULT ") :])


def _run(num_devices, *args):
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args],
        env=_env(num_devices),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _parse(proc.stdout)


@pytest.fixture(scope="module")
def single_device():
    """The reference, in this (single-device) test process."""
    import jax

    assert jax.device_count() == 1
    sys.path.insert(0, str(WORKER.parent))
    import scale_worker

    return json.loads(json.dumps(scale_worker.compute()))


def _assert_same(result, reference):
    for bs in ("8",):
        for field in ("top", "bottom", "hv"):
            got, ref = np.asarray(result[bs][field]), np.asarray(reference[bs][field])
            scale = np.abs(ref).max()
            np.testing.assert_allclose(
                got, ref, rtol=0, atol=1e-10 * scale, err_msg=f"{bs} {field}"
            )


def test_four_devices_match_one(single_device):
    result = _run(4)
    assert result["num_devices"] == 4 and single_device["num_devices"] == 1
    # batches of 8 split over 4 devices; the ragged remainder (6 examples) is replicated
    assert "examples" in result["8"]["specs"][0]
    _assert_same(result, single_device)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(single_device):
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--coordinator",
                coordinator,
                "--num-processes",
                "2",
                "--process-id",
                str(rank),
            ],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, out + err
        outputs.append(_parse(out))
    for result in outputs:
        assert result["num_devices"] == 2
        _assert_same(result, single_device)
    assert {r["process"] for r in outputs} == {0, 1}

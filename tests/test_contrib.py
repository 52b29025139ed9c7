"""contrib/openkms.service: systemd-analyze verify accepts it (where systemd-analyze exists) with
its ExecStart pointed at this checkout's `openkms`, without a warning, and it keeps its hardening."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "contrib" / "openkms.service"


def test_the_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    openkms = Path(sys.executable).with_name("openkms")
    assert openkms.exists(), openkms
    text = UNIT.read_text()
    assert "ExecStart=/opt/openkms/bin/openkms serve" in text
    unit = tmp_path / "openkms.service"
    unit.write_text(text.replace("/opt/openkms/bin/openkms", str(openkms)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if str(unit) in line or "openkms" in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_the_unit_says_what_matters() -> None:
    text = UNIT.read_text()
    for line in ("KillSignal=SIGTERM", "NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=openkms",
                 "UMask=0077", "CapabilityBoundingSet=", "EnvironmentFile=-/etc/openkms/openkms.env"):
        assert line in text.splitlines(), line

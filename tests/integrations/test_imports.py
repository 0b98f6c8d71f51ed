"""``import rdrop`` (and ``rdrop.integrations``) must never import an optional framework."""

from __future__ import annotations

import subprocess
import sys

from tests.integrations._helpers import ROOT


def test_core_and_integrations_package_import_no_framework() -> None:
    code = (
        "import sys, rdrop, rdrop.integrations, rdrop.integrations.lightning\n"
        "heavy = ('transformers', 'accelerate', 'lightning', 'pytorch_lightning')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

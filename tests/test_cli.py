"""Every console script explains itself with --help and refuses a mistyped flag with a usage error (exit 2)."""
import shutil
import subprocess

import pytest

SCRIPTS = ["catsdogs_prepare", "catsdogs_train", "catsdogs_eval", "catsdogs_predict", "catsdogs_serve"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_a_mistyped_flag(script, tmp_path):
    exe = shutil.which(script)
    assert exe, f"{script} is not installed"
    shown = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: ")
    assert "CATSDOGS_" in shown.stdout  # every setting names its environment variable
    typo = subprocess.run([exe, "--modle-dir", str(tmp_path), "photo.jpg"], capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "unrecognized arguments: --modle-dir" in typo.stderr
    assert "Traceback" not in typo.stderr

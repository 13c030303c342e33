import subprocess
import sys

from fastadapt.cli import main


def test_sinusoid_command_prints_per_step_table(capsys):
    assert main(["sinusoid", "--steps", "20", "--inner-steps-test", "2"]) == 0
    out = capsys.readouterr().out
    assert "600 test tasks, K=10" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 3]
    assert [int(r[0]) for r in rows] == [0, 1, 2]


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fastadapt", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "sinusoid" in result.stdout

"""The README's main job runs end to end (at a tiny size)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_builds_trains_generates_saves_and_reloads(tmp_path):
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "main.py"), "--steps", "8", "--max-files", "20",
         "--vocab-size", "600", "--seq-len", "64", "--batch-size", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "identical logits=True, identical completion=True" in result.stdout
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

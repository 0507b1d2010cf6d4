"""The lessons run, and their texts show what their scripts draw.

Each lesson script runs with --quick in a fresh process, exactly as the README shows it (no
--out-dir), and must exit 0, write every figure it promises into the scratch folder
runs/lessons-quick/, and leave every committed figure byte for byte as it was. Each text must
embed every figure its script writes, and every figure a text embeds must be committed under
lessons/figures.
"""

import hashlib
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
LESSONS = ROOT / "lessons"
QUICK_OUT = ROOT / "runs" / "lessons-quick"  # lessons/_common.py's QUICK_FIGURES
FIGURES = {  # script -> the PNG files it writes
    "01_attention_as_convolution.py": ["01_relative_positions.png", "01_heads_as_kernel.png", "01_conv_equality.png"],
    "02_gate.py": ["02_gate_maps.png", "02_gate_curve.png"],
    "03_locality_and_heads.py": ["03_locality_strength.png", "03_head_counts.png"],
    "04_measuring_locality.py": ["04_nonlocality_at_init.png"],
    "05_escaping_locality.py": ["05_escaping_locality.png"],
    "06_sample_efficiency.py": ["06_sample_efficiency.png", "06_ablations.png"],
    "07_speed.py": ["07_throughput.png"],
}


SUMMARIES = {  # script -> the machine-readable results it writes beside its figures
    "05_escaping_locality.py": ["05_escaping_locality.json"],
    "06_sample_efficiency.py": ["06_sample_efficiency.json"],
}


def committed_figures() -> dict[str, str]:
    return {str(path.relative_to(LESSONS)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((LESSONS / "figures").rglob("*")) if path.is_file()}


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_quick_run_as_the_readme_shows_writes_to_scratch_and_leaves_committed_figures(script):
    before, started = committed_figures(), time.time()
    done = subprocess.run([sys.executable, str(LESSONS / script), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for name in FIGURES[script] + SUMMARIES.get(script, []):
        written = QUICK_OUT / name
        assert written.is_file() and written.stat().st_size > 200, f"{script} did not write {name}"
        assert written.stat().st_mtime >= started - 1, f"{script} left an old {written}"
    assert committed_figures() == before, f"{script} --quick changed committed files under lessons/figures"


def test_training_runs_in_parallel_processes_keep_their_order():
    from lessons._common import run_parallel

    finished = []
    results = run_parallel(math.sqrt, [16.0, 1.0, 9.0, 4.0], workers=2, threads=1,
                           done=lambda item, result: finished.append(item))
    assert results == [4.0, 1.0, 3.0, 2.0] and sorted(finished) == [1.0, 4.0, 9.0, 16.0]


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_lesson_text_embeds_the_committed_figures_of_its_script(script):
    text = (LESSONS / script).with_suffix(".md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(figures/([^)]+\.png)\)", text)
    missing = set(FIGURES[script]) - set(embedded)
    assert not missing, f"{script}'s text does not show {sorted(missing)}"
    for name in embedded:
        assert (LESSONS / "figures" / name).is_file(), f"figures/{name} is not committed"


def test_reading_order_lists_every_lesson():
    readme = (LESSONS / "README.md").read_text()
    for script in FIGURES:
        assert f"({Path(script).stem}.md)" in readme, f"lessons/README.md does not link {Path(script).stem}.md"

"""The lessons run, and their texts show what their scripts draw.

Each lesson script runs with --quick in a fresh process (as CI does) and must exit 0 and
write every figure it promises. Each text must embed every figure its script writes, and every
figure a text embeds must be committed under lessons/figures.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
LESSONS = ROOT / "lessons"
FIGURES = {  # script -> the PNG files it writes
    "01_attention_as_convolution.py": ["01_relative_positions.png", "01_heads_as_kernel.png", "01_conv_equality.png"],
    "02_gate.py": ["02_gate_maps.png", "02_gate_curve.png"],
    "03_locality_and_heads.py": ["03_locality_strength.png", "03_head_counts.png"],
    "04_measuring_locality.py": ["04_nonlocality_at_init.png"],
    "05_escaping_locality.py": ["05_escaping_locality.png"],
    "06_sample_efficiency.py": ["06_sample_efficiency.png", "06_ablations.png"],
    "07_speed.py": ["07_throughput.png"],
}


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_lesson_runs_quick_and_writes_its_figures(script, tmp_path):
    done = subprocess.run([sys.executable, str(LESSONS / script), "--quick", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for name in FIGURES[script]:
        figure = tmp_path / name
        assert figure.is_file() and figure.stat().st_size > 1000, f"{script} did not write {name}"


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

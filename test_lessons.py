"""The lessons run, and their texts show what their scripts draw.

Each lesson script runs with --quick in a fresh process, exactly as the README shows it (no
--out-dir), and must exit 0, write every figure it promises into the scratch folder
runs/lessons-quick/, and leave every committed figure byte for byte as it was. Each text must
embed every figure its script writes, and every figure a text embeds must be committed under
lessons/figures.
"""

import collections
import hashlib
import json
import math
import re
import shlex
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
    "08_position_embedding.py": ["08_position_embedding.png"],
    "09_more_locality.py": ["09_more_locality.png"],
    "10_far_content.py": ["10_far_content.png"],
}


SUMMARIES = {  # script -> the machine-readable results it writes beside its figures
    "05_escaping_locality.py": ["05_escaping_locality.json"],
    "06_sample_efficiency.py": ["06_sample_efficiency.json"],
    "08_position_embedding.py": ["08_position_embedding.json"],
    "09_more_locality.py": ["09_more_locality.json"],
    "10_far_content.py": ["10_far_content.json"],
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


def test_quick_sweep_writes_its_table_and_leaves_committed_figures():
    before, started = committed_figures(), time.time()
    done = subprocess.run([sys.executable, str(LESSONS / "06_sample_efficiency.py"), "--quick", "--sweep"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = json.loads((QUICK_OUT / "06_sweep.json").read_text())
    assert (QUICK_OUT / "06_sweep.json").stat().st_mtime >= started - 1
    assert {(run["name"], run["lr"]) for run in sweep["runs"]} == {(m, lr) for m in ("ConViT", "DeiT") for lr in (2e-3, 4e-3)}
    assert committed_figures() == before


def test_a_recorded_command_gives_the_recorded_top1_again(tmp_path):
    """What a lesson records of a run is the train.py command that, run again from the repository
    root in a fresh process, gives the same top-1: each flag once, paths relative to the repository."""
    from lessons._common import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, run_all

    args = parse(training_parser("", "test", RECIPE, QUICK), ["--quick", "--run-dir", str(tmp_path / "runs")])
    (result,) = run_all(args, [("t", "DeiT", 0.05, 3, ["--model", "deit_tiny"])], tmp_path / "runs")
    argv = shlex.split(result["command"])
    assert argv[:2] == ["python", "train.py"]
    flags = [token for token in argv if token.startswith("--")]
    assert len(flags) == len(set(flags)), f"a flag appears twice: {result['command']}"
    assert argv[argv.index("--data-dir") + 1] == "data" and str(ROOT) not in result["command"].replace(str(tmp_path), "")
    again = tmp_path / "again"
    argv[argv.index("--output-dir") + 1] = str(again)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads((again / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_top1"] == result["val_top1"] and last["val_loss"] == result["val_loss"]


def test_a_grown_sweep_reads_its_finished_runs_instead_of_training_them_again(tmp_path):
    from lessons._common import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, run_all

    args = parse(training_parser("", "test", RECIPE, QUICK), ["--quick", "--run-dir", str(tmp_path)])
    args.quick = False  # whole runs (of 1 x 1/f epochs), which a sweep may read back
    (first,) = run_all(args, [("t", "DeiT", 0.02, 0, ["--model", "deit_tiny"])], tmp_path, reuse=True)
    assert not first.get("reused")
    convit, deit = run_all(args, [("t", "ConViT", 0.02, 0, []), ("t", "DeiT", 0.02, 0, ["--model", "deit_tiny"])],
                           tmp_path, reuse=True)
    assert deit["reused"] and deit["val_top1"] == first["val_top1"] and deit["command"] == first["command"]
    assert not convit.get("reused") and convit["val_top1"] != first["val_top1"]


def test_convergence_rule_compares_the_last_quarter_with_the_best_before_it():
    from lessons._common import convergence

    def records(*top1):
        return [{"epoch": i + 1, "val_top1": t} for i, t in enumerate(top1)]

    assert convergence(records(10, 50, 80, 90, 95, 96, 96.2, 96.3)) == {"last_quarter_gain": 0.3, "converged": True}
    assert convergence(records(10, 50, 80, 90, 95, 96, 96.2, 97.0)) == {"last_quarter_gain": 1.0, "converged": False}
    assert convergence(records(10, 50, 97, 96, 95, 94, 96.5, 96.0)) == {"last_quarter_gain": -0.5, "converged": True}
    assert convergence(records(10, 50, 80)) == {"last_quarter_gain": None, "converged": None}  # too few to judge


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


def test_lesson_texts_and_readme_quote_the_committed_results():
    """Lessons 5 and 6 and the README's findings table quote the numbers of the committed runs:
    each figure is recomputed here from the runs in the JSON summaries (which hold every run's
    metrics.jsonl records or top-1) and looked up in the texts, formatted as they print it."""
    readme = (ROOT / "README.md").read_text()

    def mean(values):  # as the lessons compute it (statistics.mean can round a .x5 the other way)
        values = list(values)
        return sum(values) / len(values)

    lesson5 = json.loads((LESSONS / "figures" / "05_escaping_locality.json").read_text())
    text5 = (LESSONS / "05_escaping_locality.md").read_text()
    runs = lesson5["runs"]
    for row in lesson5["per_block"]:
        block = row["block"] - 1
        line = next((line for line in text5.splitlines() if line.startswith(f"| {row['block']} ({row['kind']}) |")), None)
        assert line is not None, f"lesson 5's table has no row for block {row['block']}"
        first, last = (mean(mean(run["records"][i]["nonlocality"][block]) for run in runs)
                       for i in (0, -1))
        assert f"{first:.2f} -> {last:.2f}" in line, f"block {row['block']}: nonlocality {first:.2f} -> {last:.2f}, text: {line}"
        if row["kind"] == "GPSA":
            gate = mean(mean(run["records"][-1]["gates"][block]) for run in runs)
            assert f"-> {gate:.3f}" in line, f"block {row['block']}: final sigma(lambda) {gate:.3f}, text: {line}"

    lesson6 = json.loads((LESSONS / "figures" / "06_sample_efficiency.json").read_text())
    text6 = (LESSONS / "06_sample_efficiency.md").read_text()
    top1 = collections.defaultdict(list)
    for run in lesson6["runs"]:
        top1[run["table"], run["name"], run["fraction"]].append(run["top1"])

    def cell(values):
        return f"{mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    for fraction in sorted({f for table, _, f in top1 if table == "table2"}):
        line = next(line for line in text6.splitlines() if line.startswith(f"| {fraction:.0%} |")).replace("**", "")
        cells = [cell(top1["table2", name, fraction]) for name in ("ConViT without GPSA", "DeiT", "ConViT")]
        assert re.search(r"\s.*".join(map(re.escape, cells)), line), f"lesson 6, f = {fraction:.0%}: want {cells}, text: {line}"
    table3 = {name: values for (table, name, _), values in top1.items() if table == "table3"}
    for row, average in lesson6["table3_mean_top1"].items():
        line = next(line for line in text6.splitlines() if line.startswith(f"| {row}: ")).replace("**", "")
        assert f"{average:.1f}" in line, f"lesson 6, Table 3 row {row}: mean {average:.1f}, text: {line}"
        if row in table3:  # rows a and e are Table 2's runs at 10%
            assert cell(table3[row]).split(" ")[1] in line, f"lesson 6, Table 3 row {row}: range, text: {line}"
    findings = next(line for line in readme.splitlines() if line.startswith("| ablations at 10% (Table 3)"))
    for row, average in lesson6["table3_mean_top1"].items():
        assert f"{row} {average:.1f}" in findings, f"README's Table 3 finding: row {row} is {average:.1f}"
    at_tenth = lesson6["table2_mean_top1"]["0.1"]
    assert f"DeiT {at_tenth['DeiT']:.1f} / ConViT {at_tenth['ConViT']:.1f}" in readme

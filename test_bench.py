"""bench.py measures what it says: the timing rule, the counts, and the two commands' tables.

Timings cannot be asserted, but their consistency can: with one round, the printed ratio to the
baseline is the ratio of the printed speeds. Everything else (MACs, parameters, activation bytes,
the order of the jobs) is exact.
"""

import argparse
import dataclasses
import os

import pytest
import torch

import bench
import cli
import config
import train
from conftest import one_error_line
from convit import create_model


def test_time_interleaved_rotates_compares_per_round_and_synchronises_a_gpu(monkeypatch):
    """The rules, on a fake clock: the order rotates every round; each ratio is the median of
    per-round ratios to the first job; on a GPU it waits for the device before reading the clock
    (torch.cuda.synchronize, replaced here by a counter, so the CUDA branch runs on a CPU)."""
    order, syncs, now = [], [], [0.0]
    # Round r of 3 is slow for everyone (a busy machine): 1 s, 2 s, 10 s per unit of work.
    spell = [1.0, 2.0, 10.0]
    work = {"base": 1.0, "half as fast": 2.0, "same": 1.0}

    def timed(name):
        def run():
            round_index = len(order) // len(work) % len(spell)
            order.append(name)
            now[0] += work[name] * spell[round_index]
        return run

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    jobs = {name: timed(name) for name in work}
    timings = bench.time_interleaved(jobs, rounds=3, warmup=0, device="cuda")
    assert order == ["base", "half as fast", "same", "half as fast", "same", "base", "same", "base", "half as fast"]
    assert len(syncs) == 2 * 9  # before and after every timed call
    assert timings["base"].speed_ratio == 1.0 and timings["same"].speed_ratio == 1.0
    assert timings["half as fast"].speed_ratio == 0.5  # every round says 0.5, whatever its spell
    assert timings["half as fast"].seconds == 4.0  # median of 2, 4, 20
    assert timings["half as fast"].times == (2.0, 4.0, 20.0)
    assert bench.speed_ratio_between(timings["half as fast"], timings["same"]) == 0.5  # any pair, round by round
    bench.time_interleaved(jobs, rounds=1, warmup=0, device="cpu")
    assert len(syncs) == 18  # a CPU needs no synchronising


def test_activation_memory_counts_exactly_what_autograd_keeps():
    # A linear layer keeps its input (for the weight's gradient), and its weight only when the
    # input's gradient is wanted too, as inside a network.
    layer, images = torch.nn.Linear(4, 3), torch.randn(5, 4)
    assert bench.activation_memory(layer, images) == 5 * 4 * 4 / 2**20
    assert bench.activation_memory(layer, images.requires_grad_()) == (5 * 4 + 3 * 4) * 4 / 2**20
    # The fused path keeps no B x H x N x N matrix, so it keeps less than the explicit one.
    fused = create_model("convit_tiny", img_size=32, patch_size=4, embed_dim=48, depth=3, local_up_to_layer=2)
    images = torch.randn(8, 3, 32, 32)
    explicit = bench.activation_memory(bench.explicit_twin(fused), images)
    assert bench.activation_memory(fused, images) < 0.8 * explicit


def agrees(printed_ratio: float, speed: float, baseline_speed: float, ratio_digits: int, speed_digits: int = 1) -> bool:
    """Whether a printed ratio is speed / baseline_speed, both printed to speed_digits decimals:
    with one round, the per-round ratio is exactly that ratio, so only the printed digits may differ."""
    ratio = speed / baseline_speed
    rounding = 0.5 * 10**-speed_digits
    slack = 0.5 * 10**-ratio_digits + ratio * (rounding / speed + rounding / baseline_speed)
    return abs(printed_ratio - ratio) <= slack * 1.01


def table_rows(out: str, prefixes: tuple[str, ...]) -> list[list[str]]:
    rows = [line for line in out.splitlines() if line.startswith(prefixes)]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_table1_command_measures_a_pair(capsys):
    bench.print_table1(argparse.Namespace(sizes=["tiny"], batch_size=1, rounds=1, device="cpu"))
    cells = table_rows(capsys.readouterr().out, ("| deit", "| convit"))
    assert [c[0] for c in cells] == ["deit_tiny", "convit_tiny (fused)", "convit_tiny (explicit)"]
    assert [c[1:4] for c in cells] == [["3", "192", "5.7M"], ["4", "192", "5.7M"], ["4", "192", "5.7M"]]
    macs = [float(c[4]) for c in cells]
    assert 1.0 < macs[0] < 1.5 and macs[1] == macs[2]  # the paper's "1G"; both paths do the same products
    speeds = [float(c[5]) for c in cells]
    for speed, ratio in zip(speeds[1:], (c[6] for c in cells[1:])):
        assert agrees(float(ratio.rstrip("x")), speed, speeds[0], ratio_digits=2), (ratio, speeds)


def test_compare_names_its_baseline_once_and_says_what_the_ratio_is(capsys):
    args = argparse.Namespace(batch_size=2, train_batch_size=2, memory_batch_size=2, rounds=1, device="cpu",
                              inference_only=False, img_size=32)
    bench.print_comparison(args)
    lines = capsys.readouterr().out.splitlines()
    for what, at in (("inference", 0), ("training step", 5)):
        header, columns, *rows = lines[at : at + 5]
        assert header.startswith(f"ConViT-Ti {what} against the same-size baseline (convit_tiny, local_up_to_layer=0)")
        assert header.count("same-size baseline") == 1 and "batch 2, 32x32" in header
        assert columns.split() == ["model", "img/s", "speed", "/", "the", "baseline's:", "median", "of", "1",
                                   "per-round", "ratios"]
        assert rows[0].split() == ["same-size", "baseline", rows[0].split()[2], "(the", "baseline)"]
        baseline_speed = float(rows[0].split()[2])
        for row, name in zip(rows[1:], ("convit fused", "convit explicit")):
            assert row.split()[:2] == name.split()
            speed, ratio = float(row.split()[2]), float(row.split()[3].rstrip("x"))
            assert agrees(ratio, speed, baseline_speed, ratio_digits=3), (row, baseline_speed)
    memory = lines[10:]
    assert memory[0].startswith("training memory at batch 2") and len(memory) == 4
    assert [line.split()[:-2] for line in memory[1:]] == [["same-size", "baseline"], ["convit", "fused"],
                                                          ["convit", "explicit"]]


@pytest.mark.parametrize("model", ["convit_tiny", "deit_tiny"])
def test_small_models_are_lesson_6s(model, tmp_path):
    """--small times the very networks lesson 6 trains (its recipe's train.py flags)."""
    flags = ["--dataset", "mnist10k", "--model", model, "--embed-dim", "48", "--num-heads", "4", "--depth", "4",
             "--output-dir", str(tmp_path / "run")]
    cfg, _notes = config.resolve(config.parse(flags))
    trained = train.build_model(cfg, num_classes=10)
    assert bench.small_models(patch_size=4)[model].cfg == trained.cfg
    assert bench.small_models(patch_size=2)[model].cfg.grid == (14, 14)


def test_small_command_times_each_model_beside_an_older_checkouts(capsys):
    """--small --before DIR: lesson 6's models, each timed in the same rounds as the same model (same
    weights) built by DIR's convit.py (here this very checkout); with one round the printed speed-up
    is the ratio of the two printed speeds."""
    here = os.path.dirname(os.path.abspath(bench.__file__))
    bench.print_small(argparse.Namespace(patch_size=4, before=here, train_batch_size=4, rounds=1, device="cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 5
    for what, at, batch in (("training step", 0, 4), ("evaluation", 5, 8)):
        title, header, _rule, *rows = lines[at : at + 5]
        assert title.startswith(f"lesson 6's models, {what}, 7x7 grid (patch 4): cpu, fp32, batch {batch}, 28x28")
        assert [cell.strip() for cell in header.strip("|").split("|")] == ["model", "img/s", "before img/s",
                                                                             "now / before"]
        cells = table_rows("\n".join(rows), ("|",))
        assert [row[0] for row in cells] == ["deit_tiny", "convit_tiny"]
        for _name, speed, before, ratio in cells:
            assert agrees(float(ratio.rstrip("x")), float(speed), float(before), ratio_digits=3, speed_digits=0)


def test_small_profile_finds_every_kind_of_work_it_names(capsys):
    """--small --profile: each kind of work it names occurs in lesson 6's step (so torch's op
    names still match), the shares of the self time add up to the whole, and the table says so."""
    model = bench.small_models(patch_size=4)["convit_tiny"]
    _ms, shares = bench.profile_shares(bench.training_job(model, torch.randn(8, 1, 28, 28), as_train_py=True), steps=1)
    assert list(shares) == [*bench.PROFILE_KINDS, bench.PROFILE_REST]
    assert all(share > 0 for share in shares.values()), shares
    assert abs(sum(shares.values()) - 1) < 1e-9
    bench.print_small_profile(argparse.Namespace(patch_size=4, train_batch_size=8, rounds=1, device="cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("lesson 6's models, training step, 7x7 grid (patch 4), torch.profiler over 1 steps")
    rows = table_rows("\n".join(lines[3:]), ("|",))
    assert [row[0] for row in rows] == [*bench.PROFILE_KINDS, bench.PROFILE_REST, "ms per step (the profiler adds some)"]
    assert [len(row) for row in rows] == [3] * len(rows)  # a column for each model
# bench.py refuses what no measurement can mean, in one line and before it prints or times anything.
BAD_BENCH_INPUTS = [
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),  # a median of no rounds
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),  # 0 img/s and ratios of nothing
    (["--compare", "--inference-only", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--compare", "--train-batch-size", "0"], "--train-batch-size must be at least 1, got 0"),
    (["--compare", "--memory-batch-size", "-1"], "--memory-batch-size must be at least 1, got -1"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--img-size", "20"], "--img-size 20: image 20x20 is not divisible by patch 16"),
    (["--compare", "--img-size", "0"], "--img-size must be at least 1, got 0"),
    (["--cpu-time", "--threads", "2"], "--cpu-time measures one thread: add --threads 1"),
]


@pytest.mark.parametrize("argv, says", BAD_BENCH_INPUTS, ids=[" ".join(argv) for argv, _ in BAD_BENCH_INPUTS])
def test_bad_input_is_one_line_before_anything_is_timed(argv, says, capsys):
    code = cli.run_command(bench.main, ["--sizes", "tiny", "--rounds", "1", *argv])
    captured = capsys.readouterr()
    one_error_line(code, captured.err, says)
    assert captured.out == ""  # no table header before the error


@pytest.mark.parametrize("code, says", [
    ("this is not python (", "(SyntaxError: '(' was never closed"),
    ("x = 1", "(AttributeError: module 'convit_before' has no attribute 'create_model')"),  # an older layout
    ("import torch.nn as nn\ndef create_model(name, **kwargs):\n    return nn.Linear(3, 3)\n",
     "(RuntimeError: Error(s) in loading state_dict for Linear: Missing key(s)"),  # other weights
])
def test_an_older_checkout_that_cannot_build_the_models_is_one_line(code, says, tmp_path, capsys):
    """--before runs another checkout's convit.py: whatever it raises is named, not a traceback from it."""
    (tmp_path / "convit.py").write_text(code)
    result = cli.run_command(bench.main, ["--small", "--before", str(tmp_path), "--rounds", "1"])
    captured = capsys.readouterr()
    one_error_line(result, captured.err, f"--before {tmp_path}: its convit.py cannot build lesson 6's models", says)
    assert captured.out == ""


@pytest.mark.parametrize("argv, says", [
    (["--small", "--compare"], "--small and --compare are two different measurements: give one"),
    (["--small", "--img-size", "32"], "--img-size is read only by Table 1 (neither --small nor --compare) and "
                                      "--compare, not by --small"),
    (["--small", "--batch-size", "8"], "--batch-size is read only by Table 1"),
    (["--patch-size", "2"], "--patch-size is read only by --small, not by Table 1"),
    (["--compare", "--sizes", "tiny"], "--sizes is read only by Table 1 (neither --small nor --compare), not by "
                                       "--compare"),
    (["--inference-only"], "--inference-only is read only by --compare, not by Table 1"),
    (["--small", "--memory-batch-size", "8"], "--memory-batch-size is read only by --compare, not by --small"),
    (["--train-batch-size", "8"], "--train-batch-size is read only by --compare and --small, not by Table 1"),
])
def test_a_flag_the_measurement_would_not_read_is_refused(argv, says, capsys):
    """Each of bench.py's three measurements reads some flags only: one typed for another would
    be dropped without a word, and the figures printed would not be what the reader asked for."""
    code = cli.run_command(bench.main, ["--rounds", "1", *argv])
    captured = capsys.readouterr()
    one_error_line(code, captured.err, says)
    assert captured.out == ""


def test_bench_flags_have_their_ranges_in_one_table():
    """Every numeric flag of bench.py is a field with a range (cli.flag), as train.py's are."""
    ranged = {field.name for field in dataclasses.fields(bench.Settings) if field.metadata["interval"]}
    assert ranged == {"batch_size", "train_batch_size", "memory_batch_size", "rounds", "img_size", "threads"}
    help_text = bench.build_parser().format_help()
    assert "--batch-size" in help_text and "(default 16)" in help_text

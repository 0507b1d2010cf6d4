"""A run's processes and its folder: who writes, what train.py writes, and how it keeps it whole.

A run is one process, or one per GPU under torchrun (`Process`, `start_process`); rank 0
alone writes.

A run folder (--output-dir) holds one run:

    checkpoint.pth   everything --resume needs, replaced atomically after each evaluation
    metrics.jsonl    one JSON line per evaluated epoch; never ahead of checkpoint.pth
    figure.png       the run's own figure: nonlocality (Fig. 5) and gates (Fig. 6), from metrics.jsonl
    run.lock         held by the one process that writes the folder; empty when none does
    .before-overwrite/   only while an --overwrite run has no checkpoint yet: the run it replaces

The rules, and why (docs/runs.md says them for the user):
- A folder that holds another run is refused: `--resume` continues that run, `--overwrite`
  replaces it. The old run's files are moved aside (into .before-overwrite/, a rename, so whole)
  when the new run has its data and model, and removed only once the new run has written its
  first checkpoint. A run that fails or is interrupted before then puts them back; one killed
  outright (kill -9, a power cut) leaves them aside, and the next train.py that takes the folder
  puts them back, or removes them if the new run had written its checkpoint.
- A run refused, or failing before its first checkpoint, leaves nothing behind: the folders and
  the run.lock that claim() created are removed again.
- One writer: an flock on run.lock. The operating system drops it when its process dies,
  even by SIGKILL, so a killed run never leaves the folder locked.
- The checkpoint is written first, then its metrics line. A run killed between the two has
  a checkpoint one line ahead; the line is in the checkpoint, and --resume puts it back.
- A failed write (a full disk, a read-only folder) is one `error:` line: the temporary file is
  removed and the last good checkpoint stays.

Contents: processes -> random states -> writing atomically -> the run folder (`RunFolder`,
`claim`) -> the Ctrl-C message (`where_to_continue`). Reading a checkpoint back is
checkpoints.py's; drawing the figure is plots.py's, which train.py calls when a run ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import cli
from checkpoints import CHECKPOINT

try:
    import fcntl  # POSIX; on Windows the folder goes unlocked
except ImportError:  # pragma: no cover
    fcntl = None

METRICS, FIGURE, LOCK = "metrics.jsonl", "figure.png", "run.lock"
REPLACED = ".before-overwrite"  # inside the run folder: the run --overwrite replaces, until the new one has a checkpoint


class RunError(ValueError):
    """A problem with the run folder or a checkpoint: reported as one `error:` line, exit code 2
    (cli.run_command catches every ValueError)."""


# ---------------------------------------------------------------------------------------
# Processes: one, or one per GPU under torchrun
# ---------------------------------------------------------------------------------------
@dataclass
class Process:
    """This process of the run: its rank among `world` processes, and its device."""

    rank: int  # 0 .. world - 1; rank 0 logs and saves
    world: int  # number of processes
    device: torch.device
    started_group: bool  # whether we created the process group (and so must destroy it)

    @property
    def distributed(self) -> bool:
        return self.world > 1


def start_process(device_flag: str) -> Process:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = cli.torch_device(device_flag)  # a ValueError for a typo or a missing GPU
    use_cuda = chosen.type == "cuda"
    if world == 1:
        return Process(0, 1, chosen, started_group=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if use_cuda else "gloo")  # gloo: CPU processes
    return Process(dist.get_rank(), world, device, started_group=started)


def global_sum(values: torch.Tensor, proc: Process) -> torch.Tensor:
    if proc.distributed:
        dist.all_reduce(values)
    return values


# ---------------------------------------------------------------------------------------
# Random states: what makes a resumed run draw what the uninterrupted one would have
# ---------------------------------------------------------------------------------------
def rng_states(loader_generator: torch.Generator, proc: Process) -> list[dict]:
    """Every random number generator that training draws from, for each process (rank order):
    torch's (augmentation, drop path, MixUp/CutMix), CUDA's, Python's, and the generator that
    seeds the data-loading workers. The sampler's order needs none: it follows from (seed, epoch)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "loader": loader_generator.get_state()}
    if proc.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(proc.device)
    if not proc.distributed:
        return [state]
    states = [None] * proc.world
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states: list[dict], loader_generator: torch.Generator, proc: Process):
    if len(states) != proc.world:
        print(f"note: the checkpoint has RNG states of {len(states)} processes, this run has {proc.world}; "
              "the run goes on with fresh seeds (not bit-identical)")
        torch.manual_seed(torch.seed() + proc.rank)
        return
    state = states[proc.rank]
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]  # random.getstate(): plain ints, stored as they are
    random.setstate((version, tuple(internal), gauss))
    loader_generator.set_state(state["loader"])
    if "cuda" in state and proc.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], proc.device)


# ---------------------------------------------------------------------------------------
# Writing: atomically, and one clear line when the disk says no
# ---------------------------------------------------------------------------------------
def os_reason(err: Exception) -> str:
    """What the operating system said. torch.save wraps a failed write (a full disk) in its own
    RuntimeError ("enforce fail at inline_container.cc"); the OSError is its context."""
    cause = err if isinstance(err, OSError) else err.__context__
    return cause.strerror or str(cause) if isinstance(cause, OSError) else str(err).splitlines()[0]


def save_atomically(obj, path: Path, write=None):
    """Write to a temporary file in the same folder, force it to the disk, then rename it over
    the old checkpoint: a run killed at any moment (even by a power cut) leaves either the old
    checkpoint or the new one, whole. A write that fails removes the temporary file and raises
    RunError; the old checkpoint is untouched. `write(obj, file)` writes the bytes (torch.save,
    looked up at each call, which is where the tests make the disk fill up)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the rename can be
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        kept = "the last good checkpoint is untouched" if path.exists() else "no checkpoint was written"
        raise RunError(f"could not write {path} ({os_reason(err)}); {kept}") from None
    if hasattr(os, "O_DIRECTORY"):  # and the rename itself survives a power cut (POSIX)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def writable_folder(path, flag: str, create: bool = True) -> Path:
    """Create the folder `path` if needed and prove that a file can be written in it, before any
    work starts; anything in the way is one RunError naming `flag` and the real problem.
    create=False proves the same and leaves nothing: the folders it had to make for the test are
    removed again, so that a command refused later leaves no empty folder behind. The test is a
    real write, not os.access, which says yes to root wherever the mode bits do (/proc, say)."""
    path = Path(path)
    if str(path) == "":
        raise RunError(f"{flag} is empty: name a folder")
    if path.exists() and not path.is_dir():
        raise RunError(f"{flag} {path} is a file, not a folder")
    blocker = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise RunError(f"{flag} {path} cannot be created: {blocker} is a file, not a folder")
    made = [] if create else [folder for folder in (path, *path.parents) if not folder.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"{flag} {path} cannot be written ({os_reason(err)})") from None
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # not made, or no longer empty: leave it
                folder.rmdir()
    return path


def read_metrics(run_dir) -> list[dict]:
    """The lines of a run's metrics.jsonl, one dict per evaluated epoch. A line that does not
    parse (torn by a crash, or bytes that are not text; --resume drops it) is skipped."""
    records = []
    for line in (Path(run_dir) / METRICS).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and type(record.get("epoch")) is int:  # train.py's epochs count from 1
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------
class RunFolder:
    """The --output-dir of a training run, held by this process (rank 0) from claim() to release().

    claim():    (the function below) checks that the folder can be written, takes its lock, settles
                an --overwrite that was killed, and refuses another run's folder (unless resuming
                that very run, or told to --overwrite). It changes nothing of a run.
    start():    the run has its data and model: now it moves an overwritten run aside, or cuts
                metrics.jsonl back to the epoch it resumes from.
    save():     the checkpoint, then its metrics line; after the first checkpoint, the run moved
                aside is removed.
    adopt():    a finished run resumed here from another folder: its checkpoint, copied.
    give_up():  the run stopped before its first checkpoint: the folder as claim() found it.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.checkpoint, self.metrics, self.figure = self.path / CHECKPOINT, self.path / METRICS, self.path / FIGURE
        self.replaced = self.path / REPLACED
        self.lock_file = None
        self.made: list[Path] = []  # the folders claim() created, innermost first
        self.made_lock = False  # whether claim() created run.lock
        self.started = False  # start() has run: the folder's run files are this run's
        self.same_run = False  # it resumes the checkpoint of this very folder
        self.saved = False  # this run has written a checkpoint: from then on the folder is its own

    def create(self, flag: str):
        """The folder and its parents, made and proved writable (writable_folder), remembering which
        of them did not exist, so that a refused run can remove them again."""
        self.made = [folder for folder in (self.path, *self.path.parents) if not folder.exists()]
        writable_folder(self.path, flag)

    def lock(self):
        """Take run.lock, or name the process that holds it. flock, not a file that exists or not:
        the lock dies with its process, so a killed run leaves nothing to clean up."""
        lock_path = self.path / LOCK
        self.made_lock = not lock_path.exists()
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunError(f"--output-dir {self.path} cannot be written ({os_reason(err)})") from None
        self.lock_file = os.fdopen(descriptor, "r+")
        if fcntl is None:
            return
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = lock_path.read_text().strip() or "another process"
            self.lock_file.close()
            self.lock_file, self.made_lock = None, False  # the holder's file, not ours
            raise RunError(f"--output-dir {self.path} is in use by another run ({holder}); wait for it to end, "
                           f"or choose another --output-dir") from None
        command = " ".join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "train.main"
        self.lock_file.truncate(0)
        self.lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n")
        self.lock_file.flush()

    def release(self):
        if self.lock_file is not None:
            self.lock_file.truncate(0)  # an empty run.lock: nobody holds the folder
            self.lock_file.close()  # closing drops the flock
            self.lock_file = None

    def holds_a_run(self) -> bool:
        return self.checkpoint.exists() or (self.metrics.exists() and self.metrics.stat().st_size > 0)

    def settle(self):
        """Under the lock: an --overwrite killed outright left the run it was replacing in
        REPLACED. If the new run wrote no checkpoint, the old run comes back (the checkpoint is the
        first file moved aside, so a folder without one never holds a mix of the two runs); if it
        did, the new run is the one that was asked for, and the old one goes."""
        if not self.replaced.is_dir():
            return
        if self.checkpoint.exists():
            shutil.rmtree(self.replaced, ignore_errors=True)
        else:
            self.put_back()

    def put_back(self):
        try:
            for path in sorted(self.replaced.iterdir()):
                os.replace(path, self.path / path.name)
            self.replaced.rmdir()
        except OSError as err:
            raise RunError(f"could not put back the run that --overwrite was replacing, in {self.replaced} "
                           f"({os_reason(err)}): move its files back into {self.path} by hand") from None

    def refuse_another_run(self, overwrite: bool, resume: str | None):
        resuming_here = resume is not None and Path(resume).resolve().parent == self.path.resolve()
        if resuming_here or overwrite or not self.holds_a_run():
            return
        epochs = [record["epoch"] for record in read_metrics(self.path)] if self.metrics.exists() else []
        what = f"another run (logged up to epoch {epochs[-1]})" if epochs else "another run"
        raise RunError(f"--output-dir {self.path} holds {what}: continue it with --resume {self.path}, replace it "
                       f"with --overwrite, or choose another --output-dir")

    def start(self, epochs_done: int, resumed_from: str | None = None, last_record: dict | None = None):
        """Make the folder this run's. A run resumed in its own folder keeps the metrics lines of
        the epochs its checkpoint holds: lines after the checkpoint (or torn by a crash) are
        dropped, and the checkpoint's own line (`last_record`) is put back if a crash came
        between the checkpoint and its line. Any other run moves the folder's run files aside
        (an overwritten run, kept whole until save() has written this run's first checkpoint),
        and a run resumed from another folder starts with that folder's metrics lines."""
        self.same_run = resumed_from is not None and Path(resumed_from).resolve() == self.checkpoint.resolve()
        lines = []
        if resumed_from is not None:
            source = Path(resumed_from).parent
            lines = [r for r in read_metrics(source) if r["epoch"] <= epochs_done] if (source / METRICS).exists() else []
            if isinstance(last_record, dict) and last_record.get("epoch") == epochs_done and \
                    (not lines or lines[-1]["epoch"] < epochs_done):
                lines.append(last_record)
        self.started = True
        try:
            self.checkpoint.with_name(CHECKPOINT + ".tmp").unlink(missing_ok=True)
            if self.same_run:
                self.figure.unlink(missing_ok=True)  # drawn again when the run ends
            else:
                self.move_aside()
            if resumed_from is not None:
                tmp = self.metrics.with_name(METRICS + ".tmp")  # rewritten by a rename, so a kill now loses no line
                tmp.write_text("".join(json.dumps(record) + "\n" for record in lines))
                os.replace(tmp, self.metrics)
        except OSError as err:
            raise RunError(f"could not write {self.metrics} ({os_reason(err)})") from None

    def move_aside(self):
        """The folder's run files into REPLACED, each by a rename (whole, and never copied): the
        checkpoint first, so that settle() can tell which run a folder holds."""
        present = [path for path in (self.checkpoint, self.metrics, self.figure) if path.exists()]
        if present:
            self.replaced.mkdir(exist_ok=True)
            for path in present:
                os.replace(path, self.replaced / path.name)

    def save(self, checkpoint: dict, record: dict):
        """The checkpoint first, then its metrics line: metrics.jsonl never runs ahead of the
        checkpoint. A line that cannot be written whole is cut off again. After the first
        checkpoint, the run that --overwrite replaced is removed: the new one now has a checkpoint."""
        save_atomically(checkpoint, self.checkpoint)
        self.has_saved()
        line = (json.dumps(record) + "\n").encode()
        with self.metrics.open("ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError as err:
                f.truncate(size)
                raise RunError(f"could not append epoch {record['epoch']} to {self.metrics} ({os_reason(err)}); "
                               f"the checkpoint holds it, and --resume puts it back") from None

    def adopt(self, checkpoint: str):
        """A finished run resumed into this folder from another trains nothing more: its checkpoint
        is copied here, byte for byte, so that the folder is a whole run (the metrics lines that
        start() copied, and the checkpoint that holds them), and counts as saved."""
        save_atomically(Path(checkpoint), self.checkpoint, lambda source, file: file.write(source.read_bytes()))
        self.has_saved()

    def has_saved(self):
        """This run has written its checkpoint: the folder is its own from now on, and the run that
        --overwrite moved aside is removed (what is left of it, settle() removes later)."""
        if not self.saved:
            self.saved = True
            shutil.rmtree(self.replaced, ignore_errors=True)

    def holds_metrics(self) -> bool:
        """Whether this run has logged an evaluated epoch, so that it has a figure to draw."""
        return self.started and self.metrics.exists() and bool(read_metrics(self.path))

    def give_up(self) -> str:
        """The run stopped (an error, Ctrl-C) before its first checkpoint: leave the folder as
        claim() found it. What this run wrote goes (a metrics file that --resume copied, a
        figure of it), the run that --overwrite was replacing comes back, and so do the folders
        and the run.lock that claim() created. Returns what the error line should add."""
        if self.saved:
            return ""
        if self.started and not self.same_run:
            for path in (self.metrics, self.figure, self.checkpoint.with_name(CHECKPOINT + ".tmp")):
                path.unlink(missing_ok=True)
        back = ""
        if self.replaced.is_dir():
            self.put_back()
            back = f"; the run that --overwrite was replacing is back in {self.path}"
        if self.made_lock:
            (self.path / LOCK).unlink(missing_ok=True)
            self.made_lock = False
        for folder in self.made:  # innermost first; one that holds anything now stays
            try:
                folder.rmdir()
            except OSError:
                break
        self.made = []
        return back


def claim(output_dir: str, overwrite: bool, resume: str | None, proc: Process) -> RunFolder | None:
    """Rank 0 takes the run folder (RunFolder: checked, locked, not another run's) and returns it;
    the other processes write nothing and get None, or under torchrun the same refusal. A refused
    run leaves no trace: what was created to check the folder is removed again."""
    folder, refusal = None, None
    if proc.rank == 0:
        folder = RunFolder(output_dir)
        try:
            folder.create("--output-dir")
            folder.lock()
            folder.settle()
            folder.refuse_another_run(overwrite, resume)
        except RunError as err:
            folder.give_up()
            folder.release()
            folder, refusal = None, str(err)
    if proc.distributed:  # one refusal stops every process, not only rank 0
        message = [refusal]
        dist.broadcast_object_list(message, src=0)
        refusal = message[0]
    if refusal is not None:
        raise RunError(refusal)
    return folder


def settle(output_dir) -> None:
    """Before --resume reads a folder's checkpoint: settle an --overwrite of it that was killed
    (RunFolder.settle), under its lock, so that the run being resumed is the one the folder held."""
    folder = RunFolder(output_dir)
    if not folder.replaced.is_dir():
        return
    folder.lock()
    try:
        folder.settle()
    finally:
        folder.release()


def where_to_continue(output_dir: str | None, resume: str | None, started: float) -> str:
    """After Ctrl-C: the real path of the last checkpoint to continue from, if there is one.
    A checkpoint.pth older than this run is not this run's (an --overwrite run not yet started)."""
    written = Path(output_dir or ".", CHECKPOINT).resolve()
    last = written if written.is_file() and written.stat().st_mtime >= started else (
        Path(resume).resolve() if resume else None)
    if last is None:
        return f"interrupted before the first epoch ended: no checkpoint written yet (to {written.parent})"
    return f"interrupted; the last checkpoint is {last}: continue with --resume {last}"

"""Sweeps on a SLURM cluster, through submitit (``lt-cls sweep --executor slurm``).

The pending runs of a sweep are packed into tasks of ``runs_per_task`` runs of one representation
(a task loads its entry once) and submitted as one SLURM job array with ``submitit``'s
``map_array`` (``array_parallelism`` tasks at a time). Each task appends its records to its own
file, ``OUT/parts/NAME.jsonl`` (no two processes ever append to one file, which NFS does not make
safe), and its plot diagnostics to ``OUT/parts/NAME.diagnostics.json``. The submitting process
follows the parts as they grow and, as each task ends, merges its records into
``OUT/results.jsonl`` by atomic replace. A task that ends without finishing its runs (an
exception, the time limit, a node failure, an OOM kill, ``scancel``) leaves each unfinished run a
``failed`` record naming the SLURM job and its log, marked ``lost`` so that ``--resume`` runs it
again; the parts on disk are enough to resume after the submitting process itself was killed.

SLURM is asked only through its own commands (``sbatch`` by submitit, ``squeue`` to see which
tasks still run, ``sacct`` where accounting exists, for the end state's name)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from featcache.errors import FeatcacheError

from .records import load_records, read_diagnostics, record_key

PARTS_DIR = "parts"
SLURM_DIR = "slurm"


@dataclass(frozen=True)
class SlurmExecutor:
    """Where and how the tasks of a sweep run on SLURM.

    Parameters
    ----------
    partition : str or None
        The SLURM partition (None: the cluster's default).
    time_minutes : int
        Each task's time limit.
    cpus_per_task, gpus_per_task : int
        What each task asks for (``--cpus-per-task``; ``--gpus-per-node`` of its one-task node).
    array_parallelism : int
        How many tasks of the array run at a time.
    runs_per_task : int
        Runs packed into one task (runs take seconds; a task loads its entry once for all of them).
    mem_gb : float or None
        Memory per task (None: the partition's default).
    poll_seconds : float
        How often the submitting process looks at the tasks.
    """

    partition: str | None = None
    time_minutes: int = 60
    cpus_per_task: int = 2
    gpus_per_task: int = 0
    array_parallelism: int = 64
    runs_per_task: int = 50
    mem_gb: float | None = None
    poll_seconds: float = 2.0

    def check(self) -> None:
        """Refuse impossible settings, and a machine that cannot submit to SLURM."""
        for name in ("time_minutes", "cpus_per_task", "array_parallelism", "runs_per_task"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FeatcacheError(f"--slurm-{name.replace('_', '-')}: {value!r} is not a positive integer")
        if isinstance(self.gpus_per_task, bool) or not isinstance(self.gpus_per_task, int) or self.gpus_per_task < 0:
            raise FeatcacheError(f"--slurm-gpus-per-task: {self.gpus_per_task!r} is not a non-negative integer")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise FeatcacheError(f"--slurm-mem-gb: {self.mem_gb!r} is not a positive number")
        if shutil.which("sbatch") is None or shutil.which("squeue") is None:
            raise FeatcacheError("--executor slurm: this machine has no SLURM (sbatch / squeue not on PATH); "
                                 "run the sweep here with --executor local (the default)")
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise FeatcacheError("--executor slurm needs submitit (pip install submitit), a dependency of featcache") from None

    def parameters(self) -> dict:
        """submitit's SlurmExecutor parameters."""
        parameters = {"time": self.time_minutes, "cpus_per_task": self.cpus_per_task,
                      "array_parallelism": self.array_parallelism, "ntasks_per_node": 1, "nodes": 1}
        if self.partition:
            parameters["partition"] = self.partition
        if self.gpus_per_task:
            parameters["gpus_per_node"] = self.gpus_per_task
        if self.mem_gb is not None:
            parameters["mem"] = f"{int(self.mem_gb * 1024)}M"
        return parameters

    def run(self, sweeper) -> Iterator[dict]:
        """Submit the sweeper's pending runs as one job array; yield each record as a task writes
        it, merging each finished task's records (and failed records for what it left) into the
        results file."""
        import submitit
        tasks = pack_tasks(sweeper, self.runs_per_task)
        if not tasks:
            return
        executor = submitit.SlurmExecutor(folder=sweeper.out / SLURM_DIR / "%j")
        executor.update_parameters(**self.parameters())
        try:
            jobs = executor.map_array(run_task, tasks)
        except Exception as exc:  # sbatch refused (partition, limits, ...): its message is the error
            raise FeatcacheError(f"--executor slurm: submitting {len(tasks)} task(s) failed: "
                                 f"{' '.join(str(exc).split())[:500]}") from None
        watching = [_Watched(task, job) for task, job in zip(tasks, jobs)]
        while watching:
            in_queue = _queued([w.job.job_id for w in watching])
            for watched in list(watching):
                yield from watched.new_records()
                if watched.job.job_id in in_queue:
                    continue
                yield from watched.new_records()  # what it wrote before it ended
                yield from sweeper.merge_part(watched.records, watched.lost_records(sweeper))
                watching.remove(watched)
            if watching:
                time.sleep(self.poll_seconds)


@dataclass(frozen=True)
class Task:
    """One array task: runs of one representation, and where its records go."""

    name: str
    label: str
    entry: str  # the entry directory
    spec: object  # the sweep's SweepSpec
    out: str
    runs: tuple

    @property
    def records_path(self) -> Path:
        return Path(self.out) / PARTS_DIR / f"{self.name}.jsonl"

    @property
    def diagnostics_path(self) -> Path:
        return Path(self.out) / PARTS_DIR / f"{self.name}.diagnostics.json"


def pack_tasks(sweeper, runs_per_task: int) -> list[Task]:
    """The pending runs in tasks of at most ``runs_per_task`` runs of one representation, named
    uniquely for this submission (a resumed sweep never appends to an earlier part)."""
    submission = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    tasks = []
    for rep in sweeper.representations:
        runs = [run for run in sweeper.pending if run.representation == rep.label]
        for start in range(0, len(runs), runs_per_task):
            tasks.append(Task(f"{submission}-{len(tasks):05d}", rep.label, str(rep.cache.path), sweeper.spec,
                              str(sweeper.out), tuple(runs[start:start + runs_per_task])))
    (sweeper.out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    return tasks


def run_task(task: Task) -> int:
    """What one array task runs on its node: load the entry once, run the task's runs, append
    each record to the task's own file. Returns the number of runs done."""
    import submitit

    from featcache.store import FeatureCache

    from .sweep import Representation, Sweeper
    environment = submitit.JobEnvironment()
    job = {"id": str(environment.job_id), "log": str(environment.paths.stderr), "lost": False}
    sweeper = Sweeper([Representation(task.label, FeatureCache.open(task.entry))], task.spec, Path(task.out),
                      mode="resume", memory_check=False)
    return sweeper.run_part(list(task.runs), task.records_path, task.diagnostics_path, job)


class _Watched:
    """A submitted task as the submitting process follows it."""

    def __init__(self, task: Task, job):
        self.task, self.job = task, job
        self.records: list[dict] = []
        self._offset = 0

    def new_records(self) -> Iterator[dict]:
        """The complete lines the task appended since the last look."""
        path = self.task.records_path
        try:
            with open(path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            if line.strip():
                record = json.loads(line)
                self.records.append(record)
                yield record

    def lost_records(self, sweeper) -> list[dict]:
        """A failed record for each run the task did not record, naming the job, its end and its log."""
        done = {record_key(r) for r in self.records}
        lost = [run for run in self.task.runs if sweeper.run_key(run) not in done]
        if not lost:
            return []
        ended = _end_state(self.job)
        log = str(self.job.paths.stderr)
        job = {"id": str(self.job.job_id), "log": log, "lost": True}
        failure = (f"SLURM job {self.job.job_id} {ended} before this run finished (log: {log}); "
                   "--resume runs it again")
        return [sweeper.failed_record(run, failure, job) for run in lost]


def _queued(job_ids: list[str]) -> set[str]:
    """The array tasks among ``job_ids`` that SLURM still has queued or running."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    try:
        listed = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(arrays)], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FeatcacheError(f"--executor slurm: squeue failed ({exc}); the tasks may still run: "
                             "lt-cls sweep --resume collects their records later") from None
    if listed.returncode != 0:
        if "Invalid job id" in listed.stderr:  # every task ended long enough ago to be purged
            return set()
        raise FeatcacheError(f"--executor slurm: squeue failed ({' '.join(listed.stderr.split())}); the tasks may "
                             "still run: lt-cls sweep --resume collects their records later")
    return {line.strip() for line in listed.stdout.splitlines() if line.strip()} & set(job_ids)


def _end_state(job) -> str:
    """How a task that left the queue without finishing its runs ended, as far as SLURM says."""
    if job.paths.result_pickle.exists():
        try:
            job.result()
        except Exception as exc:  # the task's own exception, re-raised by submitit with its traceback
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            return f"raised {lines[-1].strip() if lines else type(exc).__name__}"
        return "ended"
    try:
        state = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job.job_id)],
                               capture_output=True, text=True, timeout=60)
        name = state.stdout.split()[0] if state.returncode == 0 and state.stdout.split() else ""
    except (OSError, subprocess.TimeoutExpired):
        name = ""
    return f"ended {name}" if name else "ended without a result (cancelled, out of time or memory, or its node failed)"


def is_lost(record: dict) -> bool:
    """A failed record of a run whose SLURM task ended before it (``--resume`` runs it again)."""
    return record.get("status") == "failed" and bool((record.get("job") or {}).get("lost"))


def remove_parts(out: Path) -> None:
    """Forget the tasks' files of an earlier sweep in ``out`` (--overwrite): only the part files
    this module writes, never anything else."""
    folder = Path(out) / PARTS_DIR
    for pattern in ("*.jsonl", "*.diagnostics.json"):
        for path in folder.glob(pattern) if folder.is_dir() else []:
            path.unlink(missing_ok=True)


def collect_parts(out: Path) -> list[list[dict]]:
    """The records of every part file under ``out`` (what tasks wrote, merged or not)."""
    folder = Path(out) / PARTS_DIR
    if not folder.is_dir():
        return []
    return [load_records(path) for path in sorted(folder.glob("*.jsonl"))]


def merge_diagnostics(out: Path, diagnostics: dict) -> dict:
    """``diagnostics`` with what every task's diagnostics file adds (first come, first kept)."""
    folder = Path(out) / PARTS_DIR
    for path in sorted(folder.glob("*.diagnostics.json")) if folder.is_dir() else []:
        part = read_diagnostics(path, "delete it (it only feeds the plots)")
        for label, values in part.get("representations", {}).items():
            mine = diagnostics.setdefault("representations", {}).setdefault(label, {})
            for key, value in values.items():
                if isinstance(value, dict):
                    for name, item in value.items():
                        mine.setdefault(key, {}).setdefault(name, item)
                else:
                    mine.setdefault(key, value)
        if "tau_curve" in part:
            diagnostics.setdefault("tau_curve", part["tau_curve"])
    return diagnostics

"""The fenced ``bash`` and ``python`` blocks of README.md and docs/quickstart.md, run as written
(training capped by ``$FEATCACHE_MAX_EPOCHS``), so the documented commands cannot drift from the
code. A block is left out only when it needs what no test machine has: a GPU launcher, a SLURM
cluster, the user's own images or downloaded weights."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# a block holding one of these is not run here, for the reason given
EXTERNAL = {"torchrun": "a multi-process launch", "srun ": "a SLURM allocation", "--executor slurm": "a SLURM cluster",
            "~/data/": "the user's own images", "hf-hub:": "weights in a Hugging Face cache"}
# lines that are the quick start itself or install (the test runs in the installed checkout)
SKIPPED_LINES = ("make ", "pip install")


def blocks(doc: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / doc).read_text(), re.S)


def runnable(block: str) -> bool:
    return not any(marker in block for marker in EXTERNAL)


def as_script(block: str) -> str:
    """The block as the test runs it: quick-start and install lines dropped, the entry that
    ``featcache extract`` prints last kept in $ENTRY for the ``<entry>`` placeholders."""
    lines = []
    for line in block.splitlines():
        command = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not command or command.startswith(SKIPPED_LINES):
            continue
        if command.startswith("featcache extract") and not command.endswith("\\"):
            command = f"ENTRY=$({command} | tail -n 1)"
        lines.append(command.replace("<entry>", '"$ENTRY"'))
    return "\n".join(lines) + "\n"


def run_bash(doc: str, tmp_path: Path) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = "set -euo pipefail\n" + "".join(as_script(b) for b in blocks(doc, "bash") if runnable(b))
    env = {**os.environ, "FEATCACHE_DIR": str(tmp_path / "cache"), "FEATCACHE_MAX_EPOCHS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{doc}:\n{script}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_block_left_out_needs_something_external():
    for doc in ("README.md", "docs/quickstart.md"):
        for block in blocks(doc, "bash") + blocks(doc, "python"):
            if not runnable(block):
                assert any(marker in block for marker in EXTERNAL), block
        assert sum(map(runnable, blocks(doc, "bash"))) >= 2, doc


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_readme_blocks_run_and_the_documented_sweep_has_a_few_group(tmp_path):
    out = run_bash("README.md", tmp_path)
    header = next(line for line in out.splitlines() if line.startswith("| Method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    few = next(i for i, c in enumerate(columns) if c.startswith("Few"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| Method")]
    assert rows and all(re.match(r"\**\d+\.\d ± \d+\.\d", row[few]) for row in rows), out
    assert (tmp_path / "runs" / "tuned" / "results.jsonl").is_file()
    assert "\\begin{tabular}" in out and "nan" not in out.lower()


def test_quickstart_blocks_run(tmp_path):
    out = run_bash("docs/quickstart.md", tmp_path / "bash")
    assert "\\begin{tabular}" in out
    assert (tmp_path / "bash" / "runs" / "tuned" / "results.jsonl").is_file()
    # the Python blocks, in order, in one namespace (the second opens the entry the first made)
    python = tmp_path / "python"
    python.mkdir()
    code = [b for b in blocks("docs/quickstart.md", "python") if runnable(b)]
    assert len(code) == 3
    script = (f"import os, sys\nos.chdir({str(python)!r})\n" + code[0]
              + "made = str(entry.path)\n" + code[1].replace('"runs/demo/cache/<key>"', "made") + code[2])
    env = {**os.environ, "FEATCACHE_DIR": str(python / "cache"), "FEATCACHE_MAX_EPOCHS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{script}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "nan" not in done.stdout.lower(), done.stdout


def test_the_epoch_cap_says_what_it_does_and_refuses_nonsense(monkeypatch, capsys):
    from featcache.errors import FeatcacheError
    from featcache.train import capped_epochs
    monkeypatch.delenv("FEATCACHE_MAX_EPOCHS", raising=False)
    assert capped_epochs(30) == 30
    monkeypatch.setenv("FEATCACHE_MAX_EPOCHS", "2")
    assert capped_epochs(30) == 2 and "training 2 of the 30 epochs" in capsys.readouterr().err
    assert capped_epochs(1) == 1 and capsys.readouterr().err == ""
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("FEATCACHE_MAX_EPOCHS", bad)
        with pytest.raises(FeatcacheError, match="FEATCACHE_MAX_EPOCHS"):
            capped_epochs(30)

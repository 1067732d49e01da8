"""The scripts a user runs: they never delete or mix into a folder they did not make."""
from pathlib import Path

import pytest


def test_reproduce_never_deletes_a_folder_it_did_not_make(tmp_path, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).parent.parent / "scripts"
                                                  / "reproduce_fashion_mnist.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trained = []
    monkeypatch.setattr(script, "stage1", lambda *args: trained.append(args))
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for flags in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as refused:
            script.main(["--stage", "1", "--out", str(user), *flags])
        assert refused.value.code == 2
    assert (user / "notes.txt").read_text() == "keep me" and not trained
    made = tmp_path / "made"
    script.main(["--stage", "1", "--out", str(made)])
    (made / "stage1").mkdir()
    with pytest.raises(SystemExit):
        script.main(["--stage", "1", "--out", str(made)])  # an earlier run: only with --overwrite
    script.main(["--stage", "1", "--out", str(made), "--overwrite"])
    assert not (made / "stage1").exists() and len(trained) == 2

"""pinpoint.progress: the one progress bar."""
from pinpoint.progress import progress, progress_disabled


def test_enabled_and_disabled(monkeypatch, capsys):
    monkeypatch.delenv("PINPOINT_NO_PROGRESS", raising=False)
    assert not progress_disabled(True) and progress_disabled(False)
    bar = progress(5, "work", True, unit="row")
    bar.update(5)
    bar.close()
    err = capsys.readouterr().err
    assert "work" in err and "/5" in err and "row/s" in err  # leave=False clears it at the end
    bar = progress(5, "quiet", False)
    bar.update(5)
    bar.close()
    assert "quiet" not in capsys.readouterr().err


def test_environment_turns_every_bar_off(monkeypatch, capsys):
    monkeypatch.setenv("PINPOINT_NO_PROGRESS", "1")
    assert progress_disabled(True)
    bar = progress(3, "hidden", True)
    bar.update(3)
    bar.close()
    assert "hidden" not in capsys.readouterr().err

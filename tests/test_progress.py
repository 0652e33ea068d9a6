"""Progress lines: done / total, rate and ETA every few percent, for every long stage."""
from pd_core import progress
from pd_core.progress import Progress


def test_progress_reports_every_few_percent_with_rate_and_eta(monkeypatch):
    lines, now = [], [0.0]
    monkeypatch.setattr(progress, "_SINK", [lambda r: lines.append(r)])
    bar = Progress("train-x", "train x", 100, "step", every=0.25, clock=lambda: now[0])
    for _ in range(100):
        now[0] += 0.5
        bar.advance(1, note=lambda: "loss 1.0")
    assert [r.done for r in lines] == [0, 25, 50, 75, 100]
    assert lines[1].line == "train x: 25/100 steps (25%), 2.00 steps/s, ETA 38 s; loss 1.0"
    assert lines[-1].line == "train x: 100/100 steps (100%), 2.00 steps/s; loss 1.0"
    bar.advance(1)  # past the end: nothing more
    assert len(lines) == 5


def test_a_resumed_run_counts_its_own_rate(monkeypatch):
    lines, now = [], [0.0]
    monkeypatch.setattr(progress, "_SINK", [lambda r: lines.append(r)])
    bar = Progress("k", "eval", 10, "sample", done=6, every=0.5, clock=lambda: now[0])
    now[0] = 4.0
    bar.advance(4)
    assert lines[0].line.startswith("eval: 6/10 samples (60%) (6 done before), 0.00 samples/s, ETA unknown")
    assert lines[-1].rate == 1.0 and lines[-1].done == 10


def test_without_a_sink_lines_are_printed(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_SINK", [])
    Progress("k", "annotate-shards", 3, "shard").advance(3)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("annotate-shards: 0/3 shards (0%)") and out[-1].startswith("annotate-shards: 3/3 shards (100%)")

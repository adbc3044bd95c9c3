"""finetune.events: the one event format, the writer and the follower."""

from __future__ import annotations

from finetune.events import EventFollower, EventWriter, format_event, read_events


def test_event_follower_reads_only_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    follower = EventFollower(path)
    assert follower.poll() == []
    path.write_text('{"type": "log", "message": "a"}\n{"type": "lo')
    assert follower.poll() == [{"type": "log", "message": "a"}]
    with open(path, "a") as f:
        f.write('g", "message": "b"}\n')
    assert follower.poll() == [{"type": "log", "message": "b"}]
    assert follower.poll() == []


def test_writer_and_reader_round_trip(tmp_path):
    writer = EventWriter(tmp_path / "events.jsonl")
    writer({"type": "log", "message": "a"})
    writer({"type": "epoch", "epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 0.9, "val_acc": 0.6,
            "seconds": 1.0, "best": True})
    writer.close()
    events = read_events(tmp_path)
    assert [e["type"] for e in events] == ["log", "epoch"]
    assert format_event(events[1]) == ("epoch   1: train loss 1.0000 acc 0.5000 | val loss 0.9000 acc 0.6000"
                                       " | 1.0s  *best")
    assert format_event({"type": "batch"}) is None

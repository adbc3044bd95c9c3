"""finetune.events: the one event format, the writer and the follower."""

from __future__ import annotations

import json

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
    writer(
        {
            "type": "epoch",
            "epoch": 1,
            "train_loss": 1.0,
            "train_acc": 0.5,
            "val_loss": 0.9,
            "val_acc": 0.6,
            "seconds": 1.0,
            "best": True,
        }
    )
    writer.close()
    events = read_events(tmp_path)
    assert [e["type"] for e in events] == ["log", "epoch"]
    assert format_event(events[1]) == (
        "epoch   1: train loss 1.0000 acc 0.5000 | val loss 0.9000 acc 0.6000 | 1.0s  *best"
    )
    assert format_event({"type": "batch"}) is None


def test_the_end_line_shows_the_whole_time_and_where_it_went():
    """A 40,000-image head run printed 'completed in 0:03' after 280 s: the feature cache took 263."""
    end = {
        "type": "end",
        "status": "completed",
        "best": {"epoch": 3},
        "summary": "val acc 0.9",
        "seconds": 280.2,
        "cache": "features",
        "stages": {"setup": 0.6, "cache": 263.0, "training": 16.5, "evaluation": 0.1},
    }
    assert format_event(end) == "completed in 4:40 (feature cache 4:23, training 0:16); best epoch 3\nval: val acc 0.9"
    streamed = dict(
        end, seconds=75.0, cache="stream", stages={"setup": 12.0, "cache": 0.01, "training": 60.0, "evaluation": 3.0}
    )
    assert format_event(streamed).startswith("completed in 1:15 (set-up 0:12, training 1:00, evaluation 0:03);")
    old = {k: v for k, v in end.items() if k not in ("stages", "cache")}  # an events.jsonl from before
    assert format_event(old).startswith("completed in 4:40; best epoch 3")


def conforms(value, hint) -> bool:
    """`value` is of the type an event's TypedDict gives its key (the outer type of a container)."""
    from types import NoneType, UnionType
    from typing import Any, Literal, Union, get_args, get_origin, is_typeddict

    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin in (Union, UnionType):
        return any(conforms(value, arg) for arg in get_args(hint))
    if is_typeddict(hint):
        return isinstance(value, dict) and hint.__required_keys__ <= value.keys()
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return hint is Any or isinstance(value, NoneType if hint is None else origin or hint)


def test_every_event_a_training_emits_is_its_typed_dict(tiny_run, tmp_path, monkeypatch):
    """Each type of event: every event has exactly the keys of its TypedDict, of the types it gives them.
    From the shared tiny run's events.jsonl, and from a training that fails once its run folder exists
    (the scan's progress, which only on_event gets, and an error); its events.jsonl holds the same events
    but the progress."""
    from typing import get_type_hints

    import pytest
    from conftest import make_class_folders

    from finetune import training
    from finetune.config import FinetuneError, TrainConfig
    from finetune.events import EVENT_TYPES

    def fail(*args, **kwargs):
        raise FinetuneError("no data pipeline today")

    monkeypatch.setattr(training, "setup_session", fail)
    data = make_class_folders(tmp_path / "photos", per_class=2)
    cfg = TrainConfig(
        data=str(data),
        runs_dir=str(tmp_path / "runs"),
        weights="none",
        epochs=1,
        image_size=32,
        workers=0,
        device="cpu",
    )
    failed: list = []
    with pytest.raises(FinetuneError, match="no data pipeline today"):
        training.train(cfg, on_event=failed.append)
    (run,) = (tmp_path / "runs").iterdir()
    assert read_events(run) == [json.loads(json.dumps(e)) for e in failed if e["type"] != "progress"]
    events = failed + read_events(tiny_run)
    assert {e["type"] for e in events} == set(EVENT_TYPES)
    for event in events:
        kind = EVENT_TYPES[event["type"]]
        assert kind.__required_keys__ <= event.keys() <= kind.__required_keys__ | kind.__optional_keys__, event
        hints = get_type_hints(kind)
        assert all(conforms(value, hints[key]) for key, value in event.items()), (event, hints)


def test_a_line_json_cannot_hold_as_python_is_skipped_not_a_crash(tmp_path):
    """A run folder from anyone: a line that is not UTF-8, an int of 5,000 digits (Python refuses to
    read it: ValueError) or nesting too deep for the parser (RecursionError) is skipped like any other
    bad line, and the events around it still come."""
    path = tmp_path / "events.jsonl"
    good = b'{"type": "log", "message": "a"}\n'
    path.write_bytes(good + b'{"type": "log", "message": "\xff"}\n' + b"[" * 200_000 + b"\n")
    with open(path, "ab") as f:
        f.write(b'{"type": "log", "message": ' + b"9" * 5000 + b"}\n" + good)
    assert EventFollower(path).poll() == [{"type": "log", "message": "a"}] * 2


def test_a_json_file_the_user_names_fails_in_one_line_however_it_is_broken(tmp_path):
    import pytest

    from finetune.config import FinetuneError
    from finetune.fsutil import read_json

    for name, data in (("deep.json", b"[" * 200_000), ("wide.json", b"9" * 5000), ("bytes.json", b'"\xff"')):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FinetuneError, match=f"config file .*{name} is not valid JSON") as raised:
            read_json(tmp_path / name, "config file")
        assert len(str(raised.value)) < 400

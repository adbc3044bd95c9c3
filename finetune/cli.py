"""`python -m finetune train|predict|evaluate|export|doctor|scan|selftest|sample-data`: the command line.

Every error the user can cause is one line on stderr and exit status 2; never a traceback.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .config import ARCHS, EXPORT_FORMATS, GROUPS, FinetuneError, TrainConfig, cli_fields
from .progress import TerminalProgress, shown  # shown: each line through names.printable

# ---------------------------------------------------------------------------------------------
# The terminal: everything the commands print goes through say() (or TerminalProgress.write)


def say(text="", *, err: bool = False, flush: bool = False) -> None:
    """print() for the commands: stdout, or stderr with `err`."""
    print(shown(text), file=sys.stderr if err else sys.stdout, flush=flush)


# torchrun sends SIGKILL 30 s after SIGTERM: a process that cannot stop in time (stuck in a collective)
# marks its run and exits a little before that.
SIGTERM_GRACE_S = 25.0
# How long the marking of the run may take before the process exits anyway (a lock the stuck main thread
# holds, such as stderr's when its pipe is full, must not keep it alive past torchrun's SIGKILL).
GIVE_UP_MARK_S = 3.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_POLL_S = 0.5  # how often the thread that takes the signals looks whether the command is over


def install_stop_handlers(stop: threading.Event, progress: TerminalProgress | None = None) -> Callable[[], None]:
    """First Ctrl-C (or SIGTERM): finish the current batch and keep a usable run. Second: abort.

    After a SIGTERM the process has SIGTERM_GRACE_S seconds; if it is still running then, it marks
    its run as ended (never left at "running") and exits. Returns put_back(): the handlers and the
    signal mask as they were before (for a caller that lives on: a test running the command).

    Python runs a signal handler only when the main thread is back in the interpreter, never while it
    waits in C++ (an all_reduce whose peer is frozen). So where the platform allows (pthread_sigmask and
    sigtimedwait: Linux and most Unixes; not macOS or Windows, which keep the handlers alone), a helper
    thread takes the signals. Call this before other threads start (torch's, numpy's BLAS): each
    inherits the mask of the thread that starts it, and one without the mask could take a signal that
    only the stuck main thread would then act on."""
    react = _stop_reaction(stop, progress)

    def handler(signum, frame):
        # the fallback where signals are not taken in a thread, and the main thread's side of an abort
        # (the helper thread interrupts it with _thread.interrupt_main)
        if react(signum):
            raise KeyboardInterrupt

    # a handler, never SIG_IGN (a background job's children ignore SIGINT), even where the thread takes
    # them: POSIX leaves it open whether an ignored signal stays pending while it is blocked
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}

    def handlers_back() -> None:
        for signum, before in previous.items():
            signal.signal(signum, signal.SIG_DFL if before is None else before)

    if not (hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigtimedwait") and hasattr(os, "register_at_fork")):
        return handlers_back
    return _take_signals_in_a_thread(react, handlers_back)


def _stop_reaction(stop: threading.Event, progress: TerminalProgress | None) -> Callable[[int], bool]:
    """react(signum) for a SIGINT or SIGTERM, in whichever thread takes it: True when the command should
    abort (a signal after the first). The first sets `stop`; any SIGTERM starts the grace timer (once:
    it is left running when the command ends, as the process is going down)."""
    grace = threading.Timer(SIGTERM_GRACE_S, _give_up, args=(progress,))
    grace.daemon = True
    lock = threading.Lock()

    def react(signum: int) -> bool:
        with lock:
            if signum == signal.SIGTERM and grace.ident is None:
                grace.start()
            if stop.is_set():
                return True
            stop.set()
        say("\nstopping after the current batch (Ctrl-C again to abort)", err=True, flush=True)
        return False

    return react


def _take_signals_in_a_thread(react: Callable[[int], bool], handlers_back: Callable[[], None]) -> Callable[[], None]:
    """SIGINT and SIGTERM blocked in this thread (and so in every thread it starts from now on) and taken
    by a daemon thread in sigtimedwait, which acts at once whatever the main thread is doing. Returns
    put_back(), for the main thread.

    Children: a forked one (DataLoader workers under the fork start method, Linux's default before
    Python 3.14) gets the previous mask back at once, so torch's worker still ends on its parent's
    SIGTERM (DataLoader's terminate()). One started by exec (spawn or forkserver workers: Python >= 3.14;
    subprocesses) keeps SIGINT and SIGTERM blocked: Ctrl-C and torchrun's SIGTERM to the process group
    pass it by, and it ends as torch's workers always do, on the done event or when its watchdog sees
    the parent gone (within 5 s), or by torchrun's SIGKILL of the group."""
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    over = threading.Event()

    def unblocked_in_child() -> None:
        if not over.is_set():  # a hook cannot be unregistered: inert once the command is over
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)

    os.register_at_fork(after_in_child=unblocked_in_child)

    def take() -> None:
        while not over.is_set():
            info = signal.sigtimedwait(STOP_SIGNALS, SIGNAL_POLL_S)
            if info is None:
                continue
            if over.is_set():  # taken as the command ended: for the handlers put back
                os.kill(os.getpid(), info.si_signo)
            elif react(info.si_signo):
                _thread.interrupt_main()  # its SIGINT handler raises KeyboardInterrupt, as a Ctrl-C did

    taker = threading.Thread(target=take, name="finetune-stop-signals", daemon=True)
    taker.start()

    def put_back() -> None:
        over.set()
        taker.join()
        handlers_back()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)  # what is pending now meets those handlers

    return put_back


def _give_up(progress: TerminalProgress | None) -> None:
    """SIGTERM_GRACE_S after a SIGTERM the process is still here, its main thread stuck (in a collective
    whose peer is frozen, say) and perhaps for ever: rank 0 marks its run as ended, and the process
    exits at once, before torchrun's SIGKILL."""

    def mark() -> None:
        if progress is not None and progress.run_dir and int(os.environ.get("RANK", "0")) == 0:
            from .jobs import mark_ended
            from .rundir import RunDir

            mark_ended(RunDir(progress.run_dir), f"terminated: did not stop within {SIGTERM_GRACE_S:.0f} s of SIGTERM")
        say("error: terminated: could not stop in time", err=True, flush=True)

    marking = threading.Thread(target=mark, daemon=True)
    marking.start()
    marking.join(GIVE_UP_MARK_S)
    os._exit(143)  # 128 + SIGTERM; no clean-up: it would wait on the stuck main thread


# ---------------------------------------------------------------------------------------------
# Commands


def dataset_folder(data: str, quiet: bool = False) -> str:
    """DATA as given, or, for a .zip, the folder it was extracted to (finetune.archive.dataset_folder),
    its lines on stderr unless `quiet`."""
    from .archive import dataset_folder as engine_dataset_folder

    return engine_dataset_folder(data, None if quiet else (lambda line: say(line, err=True)))


def cmd_train(args) -> int:
    stop = threading.Event()
    progress = TerminalProgress(quiet=args.quiet)
    put_back = install_stop_handlers(stop, progress)  # first: the threads torch and numpy start inherit its mask
    try:
        return _train_command(args, stop, progress)
    finally:
        if put_back is not None:  # None: a stand-in that installed nothing
            put_back()


def _train_command(args, stop: threading.Event, progress: TerminalProgress) -> int:
    """`finetune train`, its stop handlers installed. A mistyped option or folder is said before torch
    loads (seconds), as training imports it."""
    if args.resume:
        from .training import resume_config

        cfg = resume_config(args.resume, epochs=args.epochs, device=args.device)
    else:
        if not args.data and not args.config:
            raise FinetuneError("give a DATA folder to train on (or --config FILE, or --resume RUN)")
        cfg = config_from_args(args)
        cfg.data = dataset_folder(cfg.data, args.quiet)
    cfg.validate()
    from .training import train

    if stop.is_set():  # asked to stop before training began: end now rather than leave an empty run
        raise KeyboardInterrupt
    run_dir = train(cfg, on_event=progress, stop=stop, resume=args.resume)
    say(f"run folder: {run_dir}")
    return 0


def config_from_args(args) -> TrainConfig:
    """--config FILE (or the defaults), then every option given on the command line on top."""
    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    given = {f.name: getattr(args, f.name) for f in cli_fields() if getattr(args, f.name, None) is not None}
    return TrainConfig.from_dict({**base.to_dict(), **given})


def mute_stdout() -> None:
    """The rest of stdout to /dev/null: its reader has gone (`| head -1`), and every later write, Python's
    last flush at exit included, would fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextlib.contextmanager
def output_may_close():
    """Printing into a pipe whose reader stopped early ends the printing, not the command: what the
    command writes to files after the block is still written."""
    try:
        yield
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:
        mute_stdout()


def cmd_predict(args) -> int:
    from .data import list_images
    from .predict import Predictor, write_csv

    predictor = Predictor.load(args.model, args.classes, args.arch, args.image_size, args.device)
    threshold = predictor.min_confidence(args.min_confidence)
    skipped: list[tuple[str, str]] = []
    paths = list_images(args.images, skipped)
    for name, reason in skipped:
        say(f"skipped {name}: {reason}", err=True)
    if not paths:
        raise FinetuneError(f"no image files found in {', '.join(args.images)}")
    if args.explain_class is not None and not args.explain:
        raise FinetuneError("--explain-class needs --explain DIR (where the heatmaps go)")
    if args.explain:
        from .extras import check_installed

        check_installed("pytorch_grad_cam")  # before the predictions are printed, not after
    with output_may_close():
        say(min_confidence_line(predictor, threshold, args.min_confidence))
    predictions = predictor.predict_paths(paths, top_k=args.top_k, batch_size=args.batch_size, min_confidence=threshold)
    csv_path = write_csv(predictions, args.csv, args.top_k) if args.csv else None  # before any printing
    with output_may_close():
        for p in predictions:
            if p.error:
                say(f"{p.path}: error: {p.error}")
            else:
                answer = (
                    f"unknown (best guess {p.label} {p.confidence:.3f})"
                    if p.unknown
                    else f"{p.label} {p.confidence:.3f}"
                )
                say(f"{p.path}: " + ", ".join([answer] + [f"{name} {prob:.3f}" for name, prob in p.top[1:]]))
    heatmaps = None
    if args.explain:
        from .explain import explain_paths

        readable: list[str | Path] = [Path(p.path) for p in predictions if p.error is None]
        heatmaps = explain_paths(predictor, readable, args.explain, args.explain_class)
    with output_may_close():
        if csv_path is not None:
            say(f"wrote {csv_path}")
        if heatmaps is not None:
            say(f"wrote {len(heatmaps)} heatmap(s) ({args.explain_class or 'the predicted class'}) to {args.explain}")
    return 0 if all(p.error is None for p in predictions) else 1


def min_confidence_line(predictor, threshold: float, given: float | None) -> str:
    suggested = predictor.suggested_min_confidence
    if given is not None:
        source = f"given; the run suggests {suggested:.2f}" if suggested is not None else "given"
    elif suggested is not None:
        source = "suggested from validation; --min-confidence 0 always answers"
    else:
        source = "this model has no calibration: always answers"
    return f"min confidence {threshold:.2f} ({source}); below it the answer is 'unknown'"


def cmd_doctor(args) -> int:
    from .curation import add_decisions, default_curation_path, leak_decisions, load_or_new_curation, save_curation
    from .data_doctor import default_cache_dir, run_doctor, write_csv, write_json
    from .paths import default_runs_dir

    if args.run and (args.arch or args.weights):
        raise FinetuneError("--run uses the run's own backbone: give either --run or --arch/--weights")
    data = dataset_folder(args.data, args.quiet)
    log = None if args.quiet else (lambda message: say(message, err=True, flush=True))
    report = run_doctor(
        data,
        run=args.run,
        arch=args.arch or TrainConfig.arch,
        weights=args.weights or "imagenet",
        image_size=args.image_size,
        folds=args.folds,
        device=args.device,
        batch_size=args.batch_size,
        cache_dir=None if args.no_cache else default_cache_dir(),
        log=log,
        labels=args.labels,
    )
    say(report.summary_text(limit=args.show))
    if args.json:
        say(f"wrote {write_json(report, args.json)}")
    if args.csv:
        say(f"wrote {write_csv(report, args.csv)}")
    if args.leaks_to is not None:
        decisions = leak_decisions(report.duplicate_groups)
        target = Path(args.leaks_to or default_curation_path(default_runs_dir(), report.data))
        path = save_curation(add_decisions(load_or_new_curation(target, report.data), decisions), target)
        say(f"wrote {len(decisions)} leak exclusion(s) to {path}: train with --curation {path}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run

    evaluation = evaluate_run(
        args.run,
        args.data,
        min_confidence=args.min_confidence,
        batch_size=args.batch_size,
        device=args.device,
        out=args.out,
        held_out_only=args.held_out_only,
        log=lambda line: say(line, err=True),
        labels=args.labels,
    )
    say(evaluation.summary_text())
    return 0


def cmd_export(args) -> int:
    from .export import export

    if args.format == "hf":
        from .hub import export_hf

        if args.embed_preprocessing or args.half:
            raise FinetuneError(
                "--format hf holds the plain float32 weights: --embed-preprocessing and --half are not for it"
            )
        say(f"wrote {export_hf(args.run, args.out)} (finetune push {args.run} USER/NAME uploads it to the Hub)")
        return 0
    say(f"wrote {export(args.run, args.format, args.out, args.embed_preprocessing, args.half)}")
    return 0


def cmd_push(args) -> int:
    from .hub import push

    say(f"pushed {args.run} to {push(args.run, args.repo_id, args.private)}")
    return 0


def _add_push_command(sub: argparse._SubParsersAction) -> None:
    """The `push` command: the hf export of a run uploaded to the Hugging Face Hub (finetune/hub.py)."""
    push_parser = sub.add_parser(
        "push",
        help="upload a run's model folder (export --format hf) to the Hugging Face Hub",
        formatter_class=DefaultsHelpFormatter,
        description="Exports RUN as a model folder (weights as safetensors, config.json, a model card) and "
        "uploads it to the model repository REPO_ID, created when missing. The token is yours: `hf auth login` "
        "or $HF_TOKEN.",
    )
    push_parser.add_argument("run", help="run folder")
    push_parser.add_argument("repo_id", help="USER/NAME or ORG/NAME on the Hub")
    push_parser.add_argument("--private", action="store_true", help="create the repository private")
    push_parser.set_defaults(func=cmd_push)


def cmd_runs(args) -> int:
    from .paths import default_runs_dir
    from .runtable import runs_table

    table = runs_table(args.runs_dir or default_runs_dir())
    say(table.to_json() if args.json else table.text())
    return 0


def _add_runs_command(sub: argparse._SubParsersAction) -> None:
    """The `runs` command: every run of a runs folder in a table (finetune/runtable.py)."""
    runs_parser = sub.add_parser(
        "runs",
        help="list the runs of a runs folder, newest first: data, model, epochs, accuracy, F1, ECE, status",
        formatter_class=DefaultsHelpFormatter,
    )
    runs_parser.add_argument(
        "--runs-dir", default=None, help="the runs folder (default: $FINETUNE_RUNS_DIR, else ./runs)"
    )
    runs_parser.add_argument("--json", action="store_true", help="machine-readable output (full paths)")
    runs_parser.set_defaults(func=cmd_runs)


def cmd_scan(args) -> int:
    from .data import scan_dataset

    scan = scan_dataset(dataset_folder(args.data, args.json), args.val_fraction, args.seed, labels=args.labels)
    say(json.dumps(scan.to_dict(), indent=2) if args.json else scan.report())
    return 0


def cmd_selftest(args) -> int:
    from .selftest import main as selftest

    return selftest(args)


def cmd_sample_data(args) -> int:
    from .sample import make_sample_dataset

    out = make_sample_dataset(args.out, per_class=args.per_class, seed=args.seed)
    say(f"wrote sample dataset to {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown one way, "(default: X)": argparse's own, added where there is one worth
    reading (not None, not a flag's False) and the help text does not say it already, and a help
    text's own "(default X)" (the generated train options) written the same way."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = re.sub(r"\(default (?!:)", "(default: ", action.help or "")
        shows_default = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if (
            any(action.default is v for v in (None, False, True))
            or "default" in text
            or action.default is argparse.SUPPRESS
            or not shows_default
        ):
            return text
        return text + " (default: %(default)s)"


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, generated from its metadata, in argument groups.

    Every default is None here: only what the user gives overrides --config (or the defaults),
    which the help text shows."""
    groups = {key: parser.add_argument_group(f"{title} options") for key, title in GROUPS.items()}
    types = {"int": int, "float": float, "str": str}
    for f in cli_fields():
        meta = f.metadata
        group = groups[meta["group"]]
        base = str(f.type).partition(" | ")[0]
        shown = "" if f.default is None or base == "bool" else f" (default {f.default})"
        if meta["positional"]:
            group.add_argument(f.name, nargs="?", default=None, help=meta["help"])
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if base == "bool":
            group.add_argument(
                flag, dest=f.name, default=None, help=meta["help"], action="store_false" if f.default else "store_true"
            )
        else:
            group.add_argument(
                flag,
                dest=f.name,
                default=None,
                type=types[base],
                choices=None if meta["many"] else meta["choices"],  # a list: TrainConfig.validate checks its names
                metavar=meta["metavar"],
                help=meta["help"] + shown,
            )


def command_name() -> str:
    """What the user typed: `python -m finetune` when run with -m, else the `finetune` command (also when
    main() is called from Python)."""
    return "python -m finetune" if Path(sys.argv[0]).name == "__main__.py" else "finetune"


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    """The `train` command: the TrainConfig options (add_config_options), --config, --resume, --quiet."""
    train_parser = sub.add_parser(
        "train",
        help="fine-tune a model on an image folder",
        formatter_class=DefaultsHelpFormatter,
        description="Train on DATA: a folder of class subfolders, or with train/ and val/ (valid/, validation/; "
        "optional test/) of class subfolders. Put -- before DATA if its name starts with a dash.",
    )
    add_config_options(train_parser)
    train_parser.add_argument(
        "--config",
        metavar="FILE.json",
        help="a whole configuration (as the studio writes it, or a run's run.json); options "
        "given on the command line override it",
    )
    train_parser.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run from its last completed epoch (only --epochs and --device may change)",
    )
    train_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    train_parser.set_defaults(func=cmd_train)


def _add_predict_command(sub: argparse._SubParsersAction) -> None:
    """The `predict` command: a model, images and the prediction options."""
    predict_parser = sub.add_parser(
        "predict",
        help="classify images or folders with a trained model",
        formatter_class=DefaultsHelpFormatter,
        description="MODEL is a run folder, or a classic state_dict .pth (then --arch, and "
        "--classes unless class_indices.json lies beside it).",
    )
    predict_parser.add_argument("model", help="run folder, exported model folder (export --format hf) or .pth file")
    predict_parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    predict_parser.add_argument("--top-k", type=int, default=3, help="classes listed per image")
    predict_parser.add_argument("--csv", help="also write the predictions to this CSV file")
    predict_parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    predict_parser.add_argument("--arch", choices=ARCHS, help="architecture of a plain .pth")
    predict_parser.add_argument("--classes", help="class_indices.json for a plain .pth")
    predict_parser.add_argument("--image-size", type=int, default=224, help="input size of a plain .pth")
    predict_parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    predict_parser.add_argument(
        "--min-confidence",
        type=probability,
        metavar="P",
        help="answer 'unknown' (with the best guess beside it) below this calibrated "
        "confidence (default: the run's suggestion from validation; 0: always answer)",
    )
    predict_parser.add_argument("--explain", metavar="DIR", help="also write a Grad-CAM heatmap per image to DIR")
    predict_parser.add_argument(
        "--explain-class",
        metavar="CLASS",
        help="the class the heatmaps explain (default: each image's predicted class)",
    )
    predict_parser.set_defaults(func=cmd_predict)


def _add_doctor_command(sub: argparse._SubParsersAction) -> None:
    """The `doctor` command: the dataset checks and where their reports go."""
    doctor_parser = sub.add_parser(
        "doctor",
        help="find likely label errors, duplicates leaking between splits, and odd images",
        formatter_class=DefaultsHelpFormatter,
        description="Reads DATA (never changes it): features from a backbone (the run's with --run, else ImageNet), "
        "a K-fold linear probe ranked by cleanlab for label errors, exact and perceptual-hash "
        "duplicates, tiny, flat and extreme-aspect images, small classes. Features are cached in "
        "~/.cache/finetune/features ($FINETUNE_FEATURE_CACHE).",
    )
    doctor_parser.add_argument("data", help="image folder or .zip")
    doctor_parser.add_argument("--run", help="a run trained on DATA: its backbone and split settings")
    doctor_parser.add_argument("--labels", metavar="FILE.csv", help="path,label[,split] rows instead of class folders")
    doctor_parser.add_argument("--arch", choices=ARCHS, help=f"backbone without --run (default {TrainConfig.arch})")
    doctor_parser.add_argument(
        "--weights", help="imagenet, none (random: rough), or a .pth state_dict (default: imagenet)"
    )
    doctor_parser.add_argument("--image-size", type=int, help="input size of the backbone (default: the run's, or 224)")
    doctor_parser.add_argument("--folds", type=int, default=5, help="folds of the out-of-sample linear probe")
    doctor_parser.add_argument("--json", metavar="FILE", help="write the whole report as JSON")
    doctor_parser.add_argument("--csv", metavar="FILE", help="write one row per finding as CSV")
    doctor_parser.add_argument(
        "--leaks-to",
        metavar="FILE",
        nargs="?",
        const="",
        help="add 'exclude' decisions for the val/test copies of leaking duplicates to this "
        "curation file (default: curation.json in $FINETUNE_RUNS_DIR, else ./runs), for "
        "train --curation",
    )
    doctor_parser.add_argument("--show", type=int, default=10, help="findings listed per kind in the summary")
    doctor_parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    doctor_parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    doctor_parser.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    doctor_parser.add_argument("--quiet", action="store_true", help="no progress lines")
    doctor_parser.set_defaults(func=cmd_doctor)


def _add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    """The `evaluate` command: a run on another labelled folder."""
    evaluate_parser = sub.add_parser(
        "evaluate",
        help="metrics and confusion matrix of a run on another labelled folder",
        formatter_class=DefaultsHelpFormatter,
    )
    evaluate_parser.add_argument("run", help="run folder")
    evaluate_parser.add_argument(
        "data", help="folder (or .zip) of class subfolders (its test/ or val/ split if it has one)"
    )
    evaluate_parser.add_argument("--out", help="report folder (default: RUN/eval-<data>-<time>)")
    evaluate_parser.add_argument(
        "--labels", metavar="FILE.csv", help="path,label[,split] rows instead of class folders (its test rows first)"
    )
    evaluate_parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    evaluate_parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    evaluate_parser.add_argument(
        "--min-confidence",
        type=probability,
        metavar="P",
        help="the threshold whose coverage is reported (default: the run's suggestion)",
    )
    evaluate_parser.add_argument(
        "--held-out-only",
        action="store_true",
        help="leave out the images that were in the run's training split (its split.json)",
    )
    evaluate_parser.set_defaults(func=cmd_evaluate)


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    """The `export` command: TorchScript, ONNX or torch.export's pt2."""
    export_parser = sub.add_parser(
        "export",
        help="export a run's model to TorchScript, ONNX, pt2 or a Hugging Face model folder",
        formatter_class=DefaultsHelpFormatter,
    )
    export_parser.add_argument("run", help="run folder")
    export_parser.add_argument(
        "--format",
        choices=(*EXPORT_FORMATS, "hf"),
        default="torchscript",
        help="file format (pt2: torch.export's ExportedProgram; hf: a folder with model.safetensors, "
        "config.json and a model card)",
    )
    export_parser.add_argument("--out", help="output file, or folder for hf (default: in the run folder; hf: RUN/hf)")
    export_parser.add_argument(
        "--embed-preprocessing",
        action="store_true",
        help="take uint8 RGB crops, normalise inside, return logits and calibrated probabilities",
    )
    export_parser.add_argument("--half", action="store_true", help="the model in float16 (outputs float32)")
    export_parser.set_defaults(func=cmd_export)


SERVE_OPTIONS = {  # ServeLimits fields offered as options (their defaults are ServeLimits')
    "max_upload_mb": "largest request body (413 beyond it, counted as it arrives)",
    "max_files": "images in one request (413 beyond)",
    "queue_size": "images waiting for the model (then 503)",
    "max_batch": "images through the model together",
    "max_connections": "open connections and requests in flight (then 503)",
    "read_timeout_s": "seconds a request's head may take to arrive (and a body's start; slow clients are cut)",
}


def cmd_serve(args) -> int:
    from .extras import require

    for module in ("fastapi", "uvicorn", "python_multipart"):  # one line naming the extra, not an ImportError
        require(module)
    from .serve import serve
    from .serve_limits import ServeLimits

    limits = ServeLimits(**{name: getattr(args, name) for name in SERVE_OPTIONS})
    serve(args.run, args.host, args.port, args.token, args.device, limits, args.allowed_hosts, log=say)
    return 0


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    """The `serve` command: a run's model over HTTP for other programs (finetune/serve.py)."""
    serve_parser = sub.add_parser(
        "serve",
        help="answer predictions over HTTP (POST /predict, GET /info, GET /health)",
        formatter_class=DefaultsHelpFormatter,
    )
    serve_parser.add_argument("run", help="run folder")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback: a token)")
    serve_parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve_parser.add_argument(
        "--token", help="the Bearer token requests must carry (default: $FINETUNE_SERVE_TOKEN; `ps` shows this one)"
    )
    serve_parser.add_argument("--device", default="auto", help="auto (the CPU while a training has the GPU), cpu, cuda")
    from .serve_limits import ServeLimits  # light: a dataclass, not the web stack

    defaults = ServeLimits()
    for name, help_text in SERVE_OPTIONS.items():
        value = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        serve_parser.add_argument(flag, type=type(value), default=value, help=help_text)
    serve_parser.add_argument(
        "--allowed-hosts",
        default=os.environ.get("FINETUNE_ALLOWED_HOSTS", ""),
        help="more host names clients may use (a reverse proxy's), comma-separated (also FINETUNE_ALLOWED_HOSTS)",
    )
    serve_parser.set_defaults(func=cmd_serve)


def cmd_suggest(args) -> int:
    from .suggest import suggest, table, write_outputs

    pool = dataset_folder(args.pool, args.quiet)
    log = None if args.quiet else (lambda message: say(message, err=True))
    suggestions, skipped = suggest(args.run, pool, args.n, args.measure, args.device, log=log, curation=args.curation)
    for name, reason in skipped:
        say(f"skipped {name}: {reason}", err=True)
    say(table(suggestions))
    for written in write_outputs(suggestions, args.json, args.csv):
        say(f"wrote {written}")
    return 0


def _add_suggest_command(sub: argparse._SubParsersAction) -> None:
    """The `suggest` command: which unlabelled images to label next (finetune/suggest.py)."""
    suggest_parser = sub.add_parser(
        "suggest",
        help="which unlabelled images to label next (most uncertain, diverse, none already in the data)",
        formatter_class=DefaultsHelpFormatter,
    )
    suggest_parser.add_argument("run", help="run folder")
    suggest_parser.add_argument("pool", help="folder or .zip of unlabelled images (only read)")
    suggest_parser.add_argument("--n", type=int, default=50, help="how many to suggest")
    suggest_parser.add_argument("--measure", choices=("margin", "entropy"), default="margin", help="uncertainty")
    suggest_parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    suggest_parser.add_argument("--json", metavar="FILE", help="write the suggestions as JSON")
    suggest_parser.add_argument("--csv", metavar="FILE", help="write the suggestions as CSV")
    suggest_parser.add_argument(
        "--curation", metavar="FILE", help="curation file: leave out the pool images decided there since the run"
    )
    suggest_parser.add_argument("--quiet", action="store_true", help="only the table")
    suggest_parser.set_defaults(func=cmd_suggest)


def _add_scan_command(sub: argparse._SubParsersAction) -> None:
    """The `scan` command; its split options default to TrainConfig's, as train splits."""
    defaults = TrainConfig()
    scan_parser = sub.add_parser(
        "scan",
        help="check an image folder and show its classes, split and skipped files",
        formatter_class=DefaultsHelpFormatter,
        description="Decodes every image of DATA (never changes it) and shows how the "
        "folder was understood (class folders, or train/ and val/ splits), "
        "the images per class and split, and the files skipped, with why.",
    )
    scan_parser.add_argument("data", help="image folder or .zip")
    scan_parser.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="share of each class held out for validation when DATA has no val/ folder, as train splits it",
    )
    scan_parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="for the train/val split, as train's --seed"
    )
    scan_parser.add_argument(
        "--labels", metavar="FILE.csv", help=TrainConfig.__dataclass_fields__["labels"].metadata["help"]
    )
    scan_parser.add_argument("--json", action="store_true", help="machine-readable output")
    scan_parser.set_defaults(func=cmd_scan)


def _add_selftest_command(sub: argparse._SubParsersAction) -> None:
    """The `selftest` command."""
    selftest_parser = sub.add_parser(
        "selftest",
        help="check training, caches, checkpoints, prediction and export on this machine's device",
        formatter_class=DefaultsHelpFormatter,
        description="Trains each strategy briefly on a generated sample dataset with the settings of the device, "
        "checks what the test suite checks on a CPU, and prints a pass/fail table (exit status 0 only "
        "when everything passes). Paste its output into a bug report.",
    )
    selftest_parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    selftest_parser.add_argument("--arch", choices=ARCHS, default=TrainConfig.arch, help="architecture to test")
    selftest_parser.add_argument(
        "--nproc",
        type=int,
        default=0,
        metavar="N",
        help="also a short torchrun training with N processes (one per GPU)",
    )
    selftest_parser.add_argument(
        "--image-size", type=int, default=None, help="input size (default 224 on a GPU, 96 on a CPU)"
    )
    selftest_parser.add_argument("--epochs", type=int, default=1, help="epochs per strategy")
    selftest_parser.add_argument("--compile", action="store_true", help="also torch.compile the trainable layers")
    selftest_parser.set_defaults(func=cmd_selftest)


def _add_sample_data_command(sub: argparse._SubParsersAction) -> None:
    """The `sample-data` command."""
    sample_parser = sub.add_parser(
        "sample-data",
        help="(re)generate the small bundled sample dataset",
        formatter_class=DefaultsHelpFormatter,
        description="Draws synthetic photos of three shapes (circle, square, triangle) "
        "into OUT/<shape>/: a dataset to try finetune on, made here, not "
        "downloaded; the same files for the same seed.",
    )
    sample_parser.add_argument("out", nargs="?", default="data", help="folder to write the class folders into")
    sample_parser.add_argument("--per-class", type=int, default=24, help="images per class")
    sample_parser.add_argument("--seed", type=int, default=0, help="for the drawings (the same seed, the same files)")
    sample_parser.set_defaults(func=cmd_sample_data)


def build_parser(prog: str = "finetune") -> argparse.ArgumentParser:
    """The whole command line: one _add_<command>_command per subcommand, in the order `--help` lists them."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune an ImageNet ResNet on a folder of labelled images."
    )
    parser.add_argument("--version", action="version", version=f"finetune-studio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_command(sub)
    _add_predict_command(sub)
    _add_doctor_command(sub)
    _add_evaluate_command(sub)
    _add_export_command(sub)
    _add_push_command(sub)
    _add_serve_command(sub)
    _add_suggest_command(sub)
    _add_runs_command(sub)
    _add_scan_command(sub)
    _add_selftest_command(sub)
    _add_sample_data_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(command_name()).parse_args(argv)
    try:
        return args.func(args)
    except FinetuneError as error:
        say(f"error: {error}", err=True)
        return 2
    except KeyboardInterrupt:
        say("aborted", err=True)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        mute_stdout()
        return 0
    except MemoryError:
        say("error: out of memory: try a smaller --batch-size or --image-size", err=True)
        return 3
    except (OSError, RuntimeError) as error:
        from .rundir import disk_full

        # a full disk under any command's write (torch's writers raise RuntimeError over the OSError)
        full = disk_full(error)
        if full is not None:
            say(f"error: {full}", err=True)
            return 2
        if isinstance(error, RuntimeError) and "out of memory" in str(error).lower():
            say("error: out of GPU memory: try a smaller --batch-size or --image-size", err=True)
            return 3
        raise


def console() -> None:
    """The `finetune` command (pip install -e . puts it on PATH)."""
    sys.exit(main())

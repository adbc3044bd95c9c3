"""2. Train: settings, Start and Stop, and the live view of the one training (progress, curves,
log, result). The training runs as its own process (finetune.jobs.TrainingJob).

The settings are generated from TrainConfig's fields (config.option: studio, rank, label, info, ui):
a field added there appears here with nothing else to edit. Not offered: data (chosen on the Data
tab: the Data tab's folder box is the event's `data`), runs_dir (the studio's own runs folder,
finetune-studio --runs-dir) and extra (free-form notes of the Python API)."""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass

import gradio as gr

from ..architectures import arch_choices
from ..config import (
    DEFAULT_LR,
    GROUPS,
    STRATEGY_HELP,
    FinetuneError,
    TrainConfig,
    default_of,
    default_strategy,
    field_type,
    listed,
    studio_fields,
    studio_label,
)
from . import views
from .common import bind, output_list, user_errors, warning
from .state import Studio

WEIGHT_CHOICES = [
    ("ImageNet (pretrained, recommended)", "imagenet"),
    ("ImageNet V2 (newer: ResNet-50/101/152; for all or last on enough data)", "imagenet-v2"),
    ("A weights file I upload (.pth state_dict)", "file"),
    ("None: train from scratch", "none"),
]
STRATEGY_CHOICES = [(f"{name}: {text}", name) for name, text in STRATEGY_HELP.items()]
# Fields shown as radio buttons with these labels; other fields with choices are dropdowns of their values.
CHOICE_LABELS = {"arch": arch_choices(), "strategy": STRATEGY_CHOICES, "weights": WEIGHT_CHOICES}
# elem_ids are the field names, but the curation box's id of old and where the page has the name (the device note)
ELEM_IDS = {"curation": "train_curation", "device": "train_device"}
# The tab's own inputs among the fields' ranks: the start_training endpoint keeps its parameters' order
# (data, arch, strategy, weights, weights_file, epochs, batch_size, lr, image_size, seed, gpus, curation).
EXTRA_RANKS = {"weights_file": 3.5, "gpus": 8.5}
FOLLOWERS = 8  # open pages following the training at once (each holds a worker thread); more wait their turn
POLL_SECONDS = 0.4


@dataclass
class TrainTab:
    tab: gr.Tab
    data_ready: gr.Markdown
    settings: dict  # TrainConfig field name -> its component (config.studio_fields)
    weights_file: gr.File
    weights_note: gr.Markdown
    device: gr.Markdown
    gpus: gr.Number
    start_btn: gr.Button
    stop_btn: gr.Button
    message: gr.Markdown
    view: dict  # the live view (live_view): progress, result, loss_plot, acc_plot, matrix, log


def initial_settings(studio: Studio) -> dict:
    """What the settings show when the page opens: TrainConfig's defaults, but the weights that can be
    had here and the strategy and learning rate that go with them (offline: from scratch, strategy all,
    as config.default_strategy)."""
    defaults = TrainConfig()
    weights = default_weights(studio)
    strategy = default_strategy(weights)
    values = {f.name: getattr(defaults, f.name) for f in studio_fields()}
    return {**values, "weights": weights, "strategy": strategy, "lr": DEFAULT_LR[strategy]}


def setting(f: dataclasses.Field, value) -> gr.Component:
    """The component of one TrainConfig field, from its type and its option(...) metadata. On top the
    labels speak for themselves (as the tab always had them); under Advanced the help explains."""
    meta = f.metadata
    base, _ = field_type(f)
    info = meta["info"] or (meta["help"] if meta["studio"] == "advanced" else None)
    props = dict(label=studio_label(f), info=info, elem_id=ELEM_IDS.get(f.name, f.name), **meta["ui"])
    if f.name in CHOICE_LABELS:
        return gr.Radio(CHOICE_LABELS[f.name], value=value, **props)
    if meta["many"]:  # a comma-separated list of choices: a multiple choice (none ticked: "none")
        return gr.Dropdown(list(meta["choices"]), value=listed(value), multiselect=True, **props)
    if meta["choices"]:
        return gr.Dropdown(list(meta["choices"]), value=value, **props)
    if base == "bool":
        return gr.Checkbox(value=value, **props)
    if base in ("int", "float"):  # an optional number left empty is None (the default)
        return gr.Number(value=value, precision=0 if base == "int" else None, **props)
    return gr.Textbox(value=value, **props)


def placed(where: str) -> list[dataclasses.Field]:
    return sorted((f for f in studio_fields() if f.metadata["studio"] == where), key=lambda f: f.metadata["rank"])


def build(studio: Studio) -> TrainTab:
    from ..device import describe_device, resolve_device

    gpus_visible = studio.visible_gpus()
    initial = initial_settings(studio)
    settings = {}
    with gr.Tab("2. Train", id="train", elem_id="tab_train") as tab:
        data_ready = gr.Markdown(elem_id="train_data")
        with gr.Row():
            with gr.Column(scale=2):
                for f in placed("left"):
                    settings[f.name] = setting(f, initial[f.name])
                    if f.name == "weights":  # the file to upload and what is known of the weights chosen
                        weights_file = gr.File(
                            label="Weights file (.pth)",
                            file_types=[".pth", ".pt"],
                            type="filepath",
                            visible=False,
                            elem_id="weights_file",
                        )
                        weights_note = gr.Markdown(elem_id="weights_note")
            with gr.Column(scale=1):
                for f in placed("right"):
                    settings[f.name] = setting(f, initial[f.name])
                device = gr.Markdown(
                    views.device_text(describe_device(resolve_device("auto")), gpus_visible), elem_id="device"
                )
                # several GPUs: one training process per GPU (torchrun, DistributedDataParallel)
                gpus = gr.Number(
                    value=max(1, gpus_visible),
                    minimum=1,
                    maximum=max(1, gpus_visible),
                    precision=0,
                    label="GPUs to train on",
                    visible=gpus_visible > 1,
                    elem_id="gpus",
                )
        with gr.Accordion("Advanced", open=False, elem_id="train_advanced"):
            for group, title in GROUPS.items():
                fields = [f for f in placed("advanced") if f.metadata["group"] == group]
                if fields:
                    gr.Markdown(f"**{title.capitalize()}**")
                    with gr.Row():
                        settings.update({f.name: setting(f, initial[f.name]) for f in fields})
        with gr.Row():
            start_btn = gr.Button("Start training", variant="primary", elem_id="start_btn")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop_btn")
        message = gr.Markdown(elem_id="train_message")
        view = live_view()
    return TrainTab(
        tab, data_ready, settings, weights_file, weights_note, device, gpus, start_btn, stop_btn, message, view
    )


def live_view() -> dict:
    """The components that follow a training: progress, result, curves, confusion matrix, log."""
    view = {
        "progress": gr.HTML(views.progress_html(None), elem_id="train_progress"),
        "result": gr.Markdown(elem_id="train_result"),
    }
    with gr.Row():
        view["loss_plot"] = gr.LinePlot(
            x="epoch",
            y="value",
            color="series",
            title="Loss",
            x_title="epoch",
            y_title="loss",
            elem_id="loss_plot",
            height=260,
            color_map=views.SERIES_COLOURS,
            colors_in_legend=[],
            label="Loss: blue = training (running mean in the epoch), orange = validation (end of each epoch)",
        )
        view["acc_plot"] = gr.LinePlot(
            x="epoch",
            y="value",
            color="series",
            title="Accuracy",
            x_title="epoch",
            y_title="accuracy",
            y_lim=[0, 1],
            elem_id="acc_plot",
            height=260,
            color_map=views.SERIES_COLOURS,
            colors_in_legend=[],
            label="Accuracy: blue = training, orange = validation",
        )
    view["matrix"] = gr.Image(
        label="Confusion matrix (validation, best epoch)",
        type="filepath",
        interactive=False,
        elem_id="train_matrix",
        buttons=["download"],
        visible=False,
        show_label=False,
        height=380,
    )
    view["log"] = gr.Textbox(
        label="Log", lines=10, max_lines=20, autoscroll=True, interactive=False, elem_id="train_log"
    )
    return view


# ---------------------------------------------------------------------------------------------
# Handlers


def default_weights(studio: Studio, arch: str = default_of("arch")) -> str:
    from ..model import weights_available

    return "imagenet" if weights_available(arch, "imagenet")[0] else "none"


def check_weights(
    studio: Studio, arch: str = default_of("arch"), weights: str = "imagenet", weights_file=None, strategy: str = "all"
) -> str:
    """Say before training whether the chosen weights can be had (and, offline, what to do)."""
    from ..model import imagenet_weights_path, weights_available

    imagenet_ok = weights_available(arch, "imagenet")[0]
    if weights == "imagenet-v2":
        ok, message = weights_available(arch, weights)
        if ok or "no ImageNet" in message:
            return ("Ready: " if ok else "**Problem:** ") + views.md(message) + ("." if not ok else "")
    named = weights if weights == "imagenet-v2" else "imagenet"
    expected = imagenet_weights_path(arch, named)
    missing = (
        f"**ImageNet {'V2 ' if named == 'imagenet-v2' else ''}weights for {views.md(arch)} are not on this "
        f"machine.** The engine looks for "
        f"{views.code(expected)} and downloads it there on first use, which needs internet access. "
        f"Offline, copy {views.code(expected.name)} there, choose *A weights file I upload*, or choose "
        f"*None: train from scratch* (works anywhere, but learns much less from small data)."
    )
    if weights == "file":
        if not weights_file:
            return "**Upload a `.pth` file** holding a ResNet state_dict of the chosen architecture."
        ok, message = weights_available(arch, str(weights_file))
        return ("Ready: " if ok else "**Problem:** ") + views.md(message)
    if weights == "imagenet":
        return f"Ready: ImageNet weights found at {views.code(expected)}." if imagenet_ok else f"**Warning:** {missing}"
    if weights == "imagenet-v2":  # known for this arch, not on this machine
        return f"**Warning:** {missing}"
    note = "Ready: training from scratch (no pretrained weights)."
    if strategy == "all":
        note += (
            " Strategy *all*, the default without pretrained weights: every layer trains, as layers left "
            "frozen would keep their random values."
        )
    else:
        note += (
            f" **Tip:** without pretrained weights the layers that strategy *{views.md(strategy)}* freezes stay "
            f"random, so it learns little; choose strategy *all* to train every layer."
        )
    return note if imagenet_ok else note + "\n\nNote: " + missing


def strategy_for_weights(studio: Studio, weights: str | None = None, strategy: str | None = None):
    """Choosing "None: train from scratch" selects strategy all (the engine's default for it, see
    config.default_strategy; check_weights says why). Other weights leave the strategy as it is; a
    strategy chosen after the weights is kept (the note then advises against it)."""
    wanted = default_strategy(weights or "imagenet")
    return wanted if wanted == "all" and strategy != wanted else gr.skip()


def weights_file_visible(studio: Studio, weights: str | None = None):
    return gr.File(visible=weights == "file")


def strategy_lr(studio: Studio, strategy: str = "last") -> float:
    return DEFAULT_LR.get(strategy, 1e-3)


def config_values(settings: dict) -> dict:
    """The settings (from the page or an API client: untrusted) as TrainConfig keywords: an empty box
    is None where the field takes None, a whole number from a number box an int where the field is one.
    Any other value goes to TrainConfig.validate as it came (which names what does not fit)."""
    offered = {f.name: f for f in studio_fields()}
    values = {}
    for name, value in settings.items():
        if name not in offered:
            raise FinetuneError(f"unknown training setting {name!r}")
        base, optional = field_type(offered[name])
        if optional and (value is None or (isinstance(value, str) and not value.strip())):
            value = None
        elif base == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif offered[name].metadata["many"] and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value) if value else "none"
        values[name] = value
    return values


def training_config(studio: Studio, data=None, weights_file=None, **settings) -> TrainConfig:
    """The TrainConfig the settings describe (keywords: the fields of config.studio_fields; those not
    given keep TrainConfig's defaults), data made absolute against the app's working directory, runs
    in the studio's runs folder; FinetuneError for settings that cannot work."""
    from ..model import weights_available

    values = config_values(settings)
    data = (data or "").strip()
    if not data:
        raise FinetuneError("Choose the training data first (Data tab).")
    folder = studio.resolve_path(data)
    if not folder.is_dir():
        raise FinetuneError(f"data folder not found: {folder} (choose the data on the Data tab)")
    arch, weights = values.get("arch", default_of("arch")), values.get("weights", default_of("weights"))
    if weights == "file":
        if not weights_file:
            raise FinetuneError("Upload a weights file, or choose ImageNet or None.")
        values["weights"] = str(weights_file if isinstance(weights_file, str) else weights_file.name)
    ok, message = weights_available(arch, values.get("weights", weights))
    if not ok and weights == "imagenet":
        # online, the engine downloads them; offline it fails fast with a one-line error (shown)
        warning(f"{message}. The training will try to download them.")
    elif not ok:
        raise FinetuneError(message)
    if values.get("labels"):
        from .data_tab import labels_path

        values["labels"] = labels_path(studio, folder, values["labels"])
    if values.get("curation") is not None:
        from ..curation import load_curation

        values["curation"] = str(studio.resolve_path(values["curation"]))
        load_curation(values["curation"])  # a missing or malformed file: said now, not in the training's log
    try:
        return TrainConfig(**values, data=str(folder), runs_dir=str(studio.runs_dir)).validate()
    except (TypeError, ValueError) as problem:
        raise FinetuneError(f"check the training settings: {problem}") from None


def start_training(studio: Studio, data=None, weights_file=None, gpus=1, **settings) -> dict:
    """Start a training of the settings (training_config's keywords) on `gpus` GPUs (at most those visible)."""
    with user_errors():
        studio.require_idle()  # said before anything about the settings
        cfg = training_config(studio, data, weights_file, **settings)
        job = studio.start(cfg, processes=max(1, min(int(gpus or 1), studio.visible_gpus())))
    return {"progress": views.progress_html(job.view), "message": f"Started {views.md(job.run_dir.name)}"}


def follow_training(studio: Studio):
    """Stream the current (or last) training: progress, curves, log, result. Ends with the process."""
    job = studio.job
    if job is None:
        yield gr.skip()
        return
    last = None
    while True:
        view = job.update()
        key = (len(view.curves), len(view.log), view.status, view.batch, view.epoch)
        if key != last:
            last = key
            yield render(studio, view)
        if job.finished():
            return
        time.sleep(POLL_SECONDS)


def render(studio: Studio, view) -> dict:
    """The outputs for one state of a training. The plots fix their colour scale when first drawn, so
    each carries both series from the start; no empty frame is sent (it would break the colours)."""
    outputs: dict[str, object] = {"progress": views.training_progress(view)}
    for name, metric in (("loss_plot", "loss"), ("acc_plot", "accuracy")):
        frame = views.curve_frame(view, metric)
        outputs[name] = gr.skip() if frame is None else gr.LinePlot(value=frame, x_lim=[0, max(1, view.epochs)])
    # an entry may hold several lines (the data report): each line shown escaped, the breaks kept
    outputs["log"] = "\n".join(views.plain(line) for entry in view.log for line in str(entry).split("\n"))
    text, matrix = views.training_result(view)
    outputs["result"] = text
    served = studio.serve_run_file(matrix) if matrix is not None else None
    outputs["matrix"] = gr.Image(value=served, visible=served is not None)
    return outputs


def stop_training(studio: Studio) -> str:
    return views.md(studio.stop())


# ---------------------------------------------------------------------------------------------
# Events


def follow_outputs(c: TrainTab) -> dict:
    """The live view in the order of the follow endpoints' outputs (API clients unpack them by position)."""
    return {name: c.view[name] for name in ("progress", "loss_plot", "acc_plot", "log", "result", "matrix")}


def start_inputs(c: TrainTab, data_path: gr.Textbox) -> dict:
    """The start_training event's inputs, by parameter name: data, the settings on top and the tab's own
    inputs by rank (the endpoint's order of old, for clients that pass them by position), then the
    Advanced settings as the tab shows them."""
    ranks = {
        **{f.name: f.metadata["rank"] for f in studio_fields() if f.metadata["studio"] != "advanced"},
        **EXTRA_RANKS,
    }
    extras = {"weights_file": c.weights_file, "gpus": c.gpus}
    on_top = sorted(ranks, key=lambda name: ranks[name])
    advanced = [name for name in c.settings if name not in ranks]
    return {"data": data_path, **{name: extras.get(name) or c.settings[name] for name in on_top + advanced}}


def keyword_event(event, names) -> object:
    """`event` called with keywords only, each defaulting to None: gradio_client offers a parameter whose
    box starts empty (an optional number) as optional only when the function names it with a default."""
    event.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names]
    )
    return event


def wire(studio: Studio, c: TrainTab, data_path: gr.Textbox):
    """`data_path` is the Data tab's folder box. Returns the follow event (for the cross-tab steps
    after a training)."""
    arch, weights, strategy = c.settings["arch"], c.settings["weights"], c.settings["strategy"]
    weights_inputs = [arch, weights, c.weights_file, strategy]
    weights.change(bind(studio, weights_file_visible), weights, c.weights_file, api_name="weights_file_visible")
    checking = bind(studio, check_weights)
    for trigger, name in (
        (arch.change, "check_weights"),
        (weights.change, "check_weights_on_choice"),
        (c.weights_file.change, "check_weights_file"),
        (strategy.change, "check_weights_strategy"),
    ):
        trigger(checking, weights_inputs, c.weights_note, api_name=name)
    strategy.change(bind(studio, strategy_lr), strategy, c.settings["lr"], api_name="strategy_lr")
    weights.change(bind(studio, strategy_for_weights), [weights, strategy], strategy, api_name="strategy_for_weights")

    started = {"progress": c.view["progress"], "message": c.message}
    following = follow_outputs(c)
    inputs = start_inputs(c, data_path)
    follow = c.start_btn.click(
        keyword_event(bind(studio, start_training, started), inputs),
        inputs_kwargs=inputs,
        outputs=output_list(started),
        api_name="start_training",
        concurrency_id="train_start",
        concurrency_limit=1,
    ).success(
        bind(studio, follow_training, following),
        None,
        output_list(following),
        api_name="follow_training",
        concurrency_id="follow",
        concurrency_limit=FOLLOWERS,
        show_progress="hidden",
    )
    c.stop_btn.click(bind(studio, stop_training), None, c.message, api_name="stop_training", concurrency_limit=None)
    return follow, weights_inputs


def wire_page_load(studio: Studio, c: TrainTab, demo: gr.Blocks, weights_inputs: list) -> None:
    """On page load: say whether the weights can be had, and follow a training that is running (or
    show the last one)."""
    demo.load(bind(studio, check_weights), weights_inputs, c.weights_note, api_name="initial_weights")
    following = follow_outputs(c)
    demo.load(
        bind(studio, follow_training, following),
        None,
        output_list(following),
        api_name="attach_training",
        concurrency_id="follow",
        concurrency_limit=FOLLOWERS,
        show_progress="hidden",
    )

"""2. Train: settings, Start and Stop, and the live view of the one training (progress, curves,
log, result). The training runs as its own process (finetune.jobs.TrainingJob)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from ..config import DEFAULT_LR, STRATEGY_HELP, FinetuneError, TrainConfig, default_strategy
from . import views
from .common import bind, error, output_list, warning
from .state import Studio

WEIGHT_CHOICES = [("ImageNet (pretrained, recommended)", "imagenet"),
                  ("A weights file I upload (.pth state_dict)", "file"),
                  ("None: train from scratch", "none")]
STRATEGY_CHOICES = [(f"{name}: {text}", name) for name, text in STRATEGY_HELP.items()]
ARCH_CHOICES = [("ResNet-34 (faster)", "resnet34"), ("ResNet-50 (more accurate, slower)", "resnet50")]
FOLLOWERS = 8  # open pages following the training at once (each holds a worker thread); more wait their turn
POLL_SECONDS = 0.4


@dataclass
class TrainTab:
    tab: gr.Tab
    data_ready: gr.Markdown
    arch: gr.Radio
    strategy: gr.Radio
    weights: gr.Radio
    weights_file: gr.File
    weights_note: gr.Markdown
    curation: gr.Textbox
    epochs: gr.Number
    batch_size: gr.Number
    lr: gr.Number
    image_size: gr.Number
    seed: gr.Number
    device: gr.Markdown
    gpus: gr.Number
    start_btn: gr.Button
    stop_btn: gr.Button
    message: gr.Markdown
    progress: gr.HTML
    result: gr.Markdown
    loss_plot: gr.LinePlot
    acc_plot: gr.LinePlot
    matrix: gr.Image
    log: gr.Textbox


def build(studio: Studio) -> TrainTab:
    from ..device import describe_device, resolve_device

    gpus_visible = studio.visible_gpus()
    # offline (no ImageNet weights) the page opens on "from scratch", so on the strategy that can learn from it
    initial_weights = default_weights(studio)
    initial_strategy = default_strategy(initial_weights)
    with gr.Tab("2. Train", id="train", elem_id="tab_train") as tab:
        data_ready = gr.Markdown(elem_id="train_data")
        with gr.Row():
            with gr.Column(scale=2):
                arch = gr.Radio(ARCH_CHOICES, value="resnet34", label="Architecture", elem_id="arch")
                strategy = gr.Radio(STRATEGY_CHOICES, value=initial_strategy, label="What to train (strategy)",
                                    elem_id="strategy")
                weights = gr.Radio(WEIGHT_CHOICES, value=initial_weights, label="Starting weights",
                                   elem_id="weights")
                weights_file = gr.File(label="Weights file (.pth)", file_types=[".pth", ".pt"], type="filepath",
                                       visible=False, elem_id="weights_file")
                weights_note = gr.Markdown(elem_id="weights_note")
                curation = gr.Textbox(label="Curation file (optional): review decisions to apply",
                                      info="Filled in from the Review tab once it has decisions for this data. "
                                           "Excluded images are left out and relabelled ones moved; the folder "
                                           "is never changed. Empty: train on the folder as it is.",
                                      placeholder="runs/curation.json", elem_id="train_curation")
            with gr.Column(scale=1):
                epochs = gr.Number(value=5, label="Epochs", minimum=1, maximum=1000, precision=0, elem_id="epochs")
                batch_size = gr.Number(value=32, label="Batch size", minimum=1, maximum=4096, precision=0,
                                       elem_id="batch_size")
                lr = gr.Number(value=DEFAULT_LR[initial_strategy], label="Learning rate (head; set per strategy)", minimum=0,
                               elem_id="lr")
                image_size = gr.Number(value=224, label="Image size (pixels)", minimum=32, maximum=1024, precision=0,
                                       elem_id="image_size")
                seed = gr.Number(value=0, label="Seed", precision=0, elem_id="seed")
                device = gr.Markdown(views.device_text(describe_device(resolve_device("auto")), gpus_visible),
                                     elem_id="device")
                # several GPUs: one training process per GPU (torchrun, DistributedDataParallel)
                gpus = gr.Number(value=max(1, gpus_visible), minimum=1, maximum=max(1, gpus_visible), precision=0,
                                 label="GPUs to train on", visible=gpus_visible > 1, elem_id="gpus")
        with gr.Row():
            start_btn = gr.Button("Start training", variant="primary", elem_id="start_btn")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop_btn")
        message = gr.Markdown(elem_id="train_message")
        progress = gr.HTML(views.progress_html(None), elem_id="train_progress")
        result = gr.Markdown(elem_id="train_result")
        with gr.Row():
            loss_plot = gr.LinePlot(x="epoch", y="value", color="series", title="Loss", x_title="epoch",
                                    y_title="loss", elem_id="loss_plot", height=260, color_map=views.SERIES_COLOURS,
                                    colors_in_legend=[],
                                    label="Loss: blue = training (running mean in the epoch), "
                                          "orange = validation (end of each epoch)")
            acc_plot = gr.LinePlot(x="epoch", y="value", color="series", title="Accuracy", x_title="epoch",
                                   y_title="accuracy", y_lim=[0, 1], elem_id="acc_plot", height=260,
                                   color_map=views.SERIES_COLOURS, colors_in_legend=[],
                                   label="Accuracy: blue = training, orange = validation")
        matrix = gr.Image(label="Confusion matrix (validation, best epoch)", type="filepath", interactive=False,
                          elem_id="train_matrix", buttons=["download"], visible=False, show_label=False, height=380)
        log = gr.Textbox(label="Log", lines=10, max_lines=20, autoscroll=True, interactive=False, elem_id="train_log")
    return TrainTab(tab, data_ready, arch, strategy, weights, weights_file, weights_note, curation, epochs, batch_size, lr,
                    image_size, seed, device, gpus, start_btn, stop_btn, message, progress, result, loss_plot,
                    acc_plot, matrix, log)


# ---------------------------------------------------------------------------------------------
# Handlers


def default_weights(studio: Studio, arch: str = "resnet34") -> str:
    from ..model import weights_available

    return "imagenet" if weights_available(arch, "imagenet")[0] else "none"


def check_weights(studio: Studio, arch: str = "resnet34", weights: str = "imagenet", weights_file=None,
                  strategy: str = "all") -> str:
    """Say before training whether the chosen weights can be had (and, offline, what to do)."""
    from ..model import imagenet_weights_path, weights_available

    imagenet_ok = weights_available(arch, "imagenet")[0]
    expected = imagenet_weights_path(arch)
    missing = (f"**ImageNet weights for {views.md(arch)} are not on this machine.** The engine looks for "
               f"{views.code(expected)} and downloads it there on first use, which needs internet access. "
               f"Offline, copy {views.code(expected.name)} there, choose *A weights file I upload*, or choose "
               f"*None: train from scratch* (works anywhere, but learns much less from small data).")
    if weights == "file":
        if not weights_file:
            return "**Upload a `.pth` file** holding a ResNet state_dict of the chosen architecture."
        ok, message = weights_available(arch, str(weights_file))
        return ("Ready: " if ok else "**Problem:** ") + views.md(message)
    if weights == "imagenet":
        return f"Ready: ImageNet weights found at {views.code(expected)}." if imagenet_ok else f"**Warning:** {missing}"
    note = "Ready: training from scratch (no pretrained weights)."
    if strategy == "all":
        note += (" Strategy *all*, the default without pretrained weights: every layer trains, as layers left "
                 "frozen would keep their random values.")
    else:
        note += (f" **Tip:** without pretrained weights the layers that strategy *{views.md(strategy)}* freezes stay "
                 f"random, so it learns little; choose strategy *all* to train every layer.")
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


def training_config(studio: Studio, data=None, arch="resnet34", strategy="last", weights="none", weights_file=None,
                    epochs=5, batch_size=32, lr=None, image_size=224, seed=0, curation=None) -> TrainConfig:
    """The TrainConfig the settings describe (data made absolute against the app's working
    directory, runs in the studio's runs folder); FinetuneError for settings that cannot work."""
    from ..model import weights_available

    data = (data or "").strip()
    if not data:
        raise FinetuneError("Choose the training data first (Data tab).")
    folder = studio.resolve_path(data)
    if not folder.is_dir():
        raise FinetuneError(f"data folder not found: {folder} (choose the data on the Data tab)")
    weights_value = weights
    if weights == "file":
        if not weights_file:
            raise FinetuneError("Upload a weights file, or choose ImageNet or None.")
        weights_value = str(weights_file if isinstance(weights_file, str) else weights_file.name)
    ok, message = weights_available(arch, weights_value)
    if not ok and weights == "imagenet":
        # online, the engine downloads them; offline it fails fast with a one-line error (shown)
        warning(f"{message}. The training will try to download them.")
    elif not ok:
        raise FinetuneError(message)
    curation_file = None
    if (curation or "").strip():
        from ..curation import load_curation

        curation_file = str(studio.resolve_path(curation))
        load_curation(curation_file)  # a missing or malformed file: said now, not in the training's log
    try:
        return TrainConfig(data=str(folder), arch=arch, strategy=strategy, weights=weights_value, epochs=int(epochs),
                           batch_size=int(batch_size), lr=float(lr) if lr else None, image_size=int(image_size),
                           seed=int(seed), runs_dir=str(studio.runs_dir), curation=curation_file).validate()
    except (TypeError, ValueError) as problem:
        raise FinetuneError(f"check the training settings: {problem}") from None


def start_training(studio: Studio, data=None, arch="resnet34", strategy="last", weights="none", weights_file=None,
                   epochs=5, batch_size=32, lr=None, image_size=224, seed=0, gpus=1, curation=None) -> dict:
    try:
        studio.require_idle()  # said before anything about the settings
        cfg = training_config(studio, data, arch, strategy, weights, weights_file, epochs, batch_size, lr,
                              image_size, seed, curation)
        job = studio.start(cfg, processes=max(1, min(int(gpus or 1), studio.visible_gpus())))
    except FinetuneError as problem:
        raise error(problem) from None
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
    outputs = {"progress": views.training_progress(view)}
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
    return {"progress": c.progress, "loss_plot": c.loss_plot, "acc_plot": c.acc_plot, "log": c.log,
            "result": c.result, "matrix": c.matrix}


def wire(studio: Studio, c: TrainTab, data_path: gr.Textbox):
    """`data_path` is the Data tab's folder box. Returns the follow event (for the cross-tab steps
    after a training)."""
    weights_inputs = [c.arch, c.weights, c.weights_file, c.strategy]
    c.weights.change(bind(studio, weights_file_visible), c.weights, c.weights_file, api_name="weights_file_visible")
    checking = bind(studio, check_weights)
    for trigger, name in ((c.arch.change, "check_weights"), (c.weights.change, "check_weights_on_choice"),
                          (c.weights_file.change, "check_weights_file"), (c.strategy.change, "check_weights_strategy")):
        trigger(checking, weights_inputs, c.weights_note, api_name=name)
    c.strategy.change(bind(studio, strategy_lr), c.strategy, c.lr, api_name="strategy_lr")
    c.weights.change(bind(studio, strategy_for_weights), [c.weights, c.strategy], c.strategy,
                     api_name="strategy_for_weights")

    started = {"progress": c.progress, "message": c.message}
    following = follow_outputs(c)
    follow = c.start_btn.click(
        bind(studio, start_training, started),
        [data_path, c.arch, c.strategy, c.weights, c.weights_file, c.epochs, c.batch_size, c.lr, c.image_size,
         c.seed, c.gpus, c.curation], output_list(started), api_name="start_training", concurrency_id="train_start",
        concurrency_limit=1,
    ).success(bind(studio, follow_training, following), None, output_list(following), api_name="follow_training",
              concurrency_id="follow", concurrency_limit=FOLLOWERS, show_progress="hidden")
    c.stop_btn.click(bind(studio, stop_training), None, c.message, api_name="stop_training", concurrency_limit=None)
    return follow, weights_inputs


def wire_page_load(studio: Studio, c: TrainTab, demo: gr.Blocks, weights_inputs: list) -> None:
    """On page load: say whether the weights can be had, and follow a training that is running (or
    show the last one)."""
    demo.load(bind(studio, check_weights), weights_inputs, c.weights_note, api_name="initial_weights")
    following = follow_outputs(c)
    demo.load(bind(studio, follow_training, following), None, output_list(following), api_name="attach_training",
              concurrency_id="follow", concurrency_limit=FOLLOWERS, show_progress="hidden")

"""Finetune Studio: the browser app over the engine (gradio). The engine never imports this package.

    state.py       the Studio: runs folder, workspace, the one training job, loaded predictors
    workspace.py   uploads, temporary inputs, the files handed to the browser, quota and clean-up
    inputs.py      the images of a batch prediction (files, zips, a server folder), bounded
    views.py       pure formatting: summaries, progress, results, tables
    components.py  an Image that hands over the upload's path undecoded, a Label with its own headline
    data_tab.py, review_tab.py, train_tab.py, evaluate_tab.py, predict_tab.py, export_tab.py
                   one module per tab: build(studio) -> components (layout), wire(...) (events),
                   and module-level handlers of (studio, ...) that tests call without a server
    app.py         arguments, launch, the cross-tab wiring; main() is the `finetune-studio` command
"""

import os

# No telemetry and nothing fetched from the internet: set here, before any module of the studio
# imports gradio (or huggingface_hub through it).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_SSR_MODE", "False")

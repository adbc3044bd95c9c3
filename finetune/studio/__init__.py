"""Finetune Studio: the browser app over the engine (gradio). The engine never imports this package.

    state.py       the Studio: runs folder, workspace, the one training job, loaded predictors
    workspace.py   uploads, temporary inputs, the files handed to the browser, quota and clean-up
    inputs.py      the images of a batch prediction (files, zips, a server folder), bounded
    views.py       pure formatting: summaries, progress, results, tables
    components.py  an Image that hands over the upload's path undecoded, a Label with its own headline
    data_tab.py, review_tab.py, train_tab.py, evaluate_tab.py, predict_tab.py, export_tab.py
                   one module per tab: build(studio) -> components (layout), wire(...) (events),
                   and module-level handlers of (studio, ...) that tests call without a server
    app.py         arguments, launch(), the cross-tab wiring; main() is the `finetune-studio` command

From Python or a notebook: `studio = finetune.studio.launch()`; `studio.url`, `studio.close()`.
"""

import os

# gradio's telemetry off, set here before any module of the studio imports gradio: some of gradio reads
# it at import. Nothing else of the process's environment is changed by importing the studio: what else
# the studio needs is passed to gradio as arguments (analytics_enabled=False, ssr_mode=False, share=...).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from .app import launch  # after the switch (app imports no gradio at import)

__all__ = ["launch"]

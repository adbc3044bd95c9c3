#!/usr/bin/env python3
"""Finetune Studio: the browser UI over the `finetune` engine (the code is in finetune/studio/).

    python app.py                      # http://127.0.0.1:7860, sample data preselected
    FINETUNE_AUTH=user:password python app.py --host 0.0.0.0
    python app.py --runs-dir my-runs --port 7861

Works from any working directory; the same as the `finetune-studio` command and
`python -m finetune.studio`. Options: `python app.py --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune.studio.app import main  # after the path line; it sets gradio's environment first

if __name__ == "__main__":
    sys.exit(main())

"""`python -m finetune.studio [options]`: the same as `finetune-studio` and `python app.py`."""

import sys

from .app import main

sys.exit(main())

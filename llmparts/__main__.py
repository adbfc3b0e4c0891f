"""``python -m llmparts ...`` is the same CLI as the ``llmparts`` console script."""

import sys

from .cli import main

sys.exit(main())

#!/usr/bin/env python
"""Benchmark llmparts against transformers in one run; same as ``llmparts bench``.

Examples::

    python scripts/benchmark.py qwen3-0.6b --dtype float32,bfloat16 --json bench.json
    python scripts/benchmark.py qwen3-0.6b --dtype float32 --contexts 128,512,1024,2048,4096 --plot docs/decode_vs_context.png
    python scripts/benchmark.py small-moe --dtype float32
"""

import sys

from llmparts.bench import main

if __name__ == "__main__":
    sys.exit(main())

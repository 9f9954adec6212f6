"""python -m pipeline.train CONFIG.yaml [section.key=value ...]: see pipeline/train/entry.py."""

import sys

from pipeline.train.entry import main

sys.exit(main())

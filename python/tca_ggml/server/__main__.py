"""python -m tca_ggml.server: the same as `tca-ggml serve` (see tca_ggml.server)."""
import sys

from . import main

sys.exit(main())

"""`python -m sparse_ffn.cli ...` = `sparse-ffn ...`."""

import sys

from sparse_ffn.cli import main

sys.exit(main())

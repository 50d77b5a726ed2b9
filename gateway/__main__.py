"""`python -m gateway` runs the `liutong-gateway` command line."""

import sys

from gateway.cli import main

sys.exit(main())

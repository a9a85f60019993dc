"""``python -m kdplug``: the same command line as ``kdplug``."""
import sys

from .cli import main

sys.exit(main())

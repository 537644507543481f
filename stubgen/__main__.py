"""`python -m mrpcd.stubgen ...` is `mrpcd-stubgen ...`."""
import sys

from .cli import main

sys.exit(main())

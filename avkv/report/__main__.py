"""``python -m avkv.report``: same as ``avkv report``."""
import sys

from avkv.report import main

sys.exit(main())

"""``python -m refghost`` runs the refghost command line."""
import sys

from .cli import main

sys.exit(main())

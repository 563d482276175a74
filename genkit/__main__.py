"""``python -m genkit`` (also what ``accelerate launch -m genkit`` runs)."""

import sys

from genkit.cli import main

sys.exit(main())

"""python -m lab: the lab's command (lab/command.py)."""
import sys

from lab.command import main

sys.exit(main())

import sys

from clockdistill.cli import main

sys.exit(main())

import sys

from epinfer.cli import main

sys.exit(main())

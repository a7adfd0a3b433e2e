import sys

from ftwt.cli import main

sys.exit(main())

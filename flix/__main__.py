import sys

from flix.cli import main

sys.exit(main())

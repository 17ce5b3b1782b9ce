import sys

from gptforge.cli import main

sys.exit(main())

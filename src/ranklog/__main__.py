import sys

from ranklog._cli import main

sys.exit(main())

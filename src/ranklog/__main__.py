import sys

from ranklog.collector.cli import main

sys.exit(main())

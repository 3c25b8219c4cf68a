import sys

from ranklog.demo.train import main

sys.exit(main())

import sys

from shim.runtime.main import main

raise SystemExit(main(sys.argv[1:]))

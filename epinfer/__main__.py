import sys

try:
    from epinfer.cli import main
except KeyboardInterrupt:  # (Ctrl-C before the command line's own handling starts)
    sys.stderr.write("epinfer: interrupted\n")
    sys.exit(130)

sys.exit(main())

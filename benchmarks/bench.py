"""Same as `kdplug bench` (see `kdplug bench --help`); kept here so the benchmark sits beside its results."""
import sys

from kdplug.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

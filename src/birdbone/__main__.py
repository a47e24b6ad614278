"""``python -m birdbone [ARGS]`` runs the project like ``kedro run [ARGS]``."""

import sys

from kedro.framework.cli import main as kedro_main


def main() -> None:
    sys.argv = ["kedro", "run", *sys.argv[1:]]
    kedro_main()


if __name__ == "__main__":
    main()

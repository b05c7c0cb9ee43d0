"""`python -m tvkd ...`: the `tvkd` command, for launchers that start modules, e.g.

    accelerate launch --multi_gpu --num_processes 2 -m tvkd run my-run.yaml
    torchrun --nproc_per_node 2 -m tvkd run my-run.yaml

(see `tvkd.distributed`). Every process leaves the process group it joined before exiting.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from tvkd.cli import main as cli_main
    from tvkd.distributed import teardown

    try:
        return cli_main(argv)
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())

"""The entry point each torchrun rank of a data-parallel distill runs: `python -m tasks.ddp ROOT RUN [--force]`
(started by `tasks.launch.launch_distill`): join the process group and run the distill stage."""
from __future__ import annotations

import argparse
from typing import Optional

from dmd_core.distributed import current, init_process_group
from tasks.context import device_for, open_run
from tasks.launch import as_rank


def main(argv: Optional[list[str]] = None) -> None:
    """One rank: join the process group (nccl on cuda:LOCAL_RANK, gloo on CPU) and run the distill stage."""
    from tasks.distill import run_distill  # this module is that stage's rank entry point, run by torchrun

    parser = argparse.ArgumentParser(prog="python -m tasks.ddp", description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("run_name")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    _, cfg = open_run(args.root, args.run_name)
    env = init_process_group(device_for(cfg).type) if cfg.distill.world_size > 1 else current()
    as_rank(lambda: run_distill(args.root, args.run_name, args.force), env.rank)


if __name__ == "__main__":
    main()

"""The entry point each torchrun rank of a data-parallel evaluation runs: `python -m tasks.eval_ranks ROOT RUN
[--all-checkpoints]` (started by `tasks.launch.launch_evaluate`): join the process group and run the evaluate
stage on this rank's share of the samples; rank 0 writes."""
from __future__ import annotations

import argparse
from typing import Optional

from dmd_core.distributed import init_process_group
from tasks.context import device_for, open_run
from tasks.launch import as_rank


def main(argv: Optional[list[str]] = None) -> None:
    """One rank: join the process group (nccl on cuda:LOCAL_RANK, gloo on CPU) and run the evaluate stage."""
    from tasks.evaluate import run_evaluate  # this module is that stage's rank entry point, run by torchrun

    parser = argparse.ArgumentParser(prog="python -m tasks.eval_ranks", description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("run_name")
    parser.add_argument("--all-checkpoints", action="store_true")
    args = parser.parse_args(argv)
    env = init_process_group(device_for(open_run(args.root, args.run_name)[1]).type)
    as_rank(lambda: run_evaluate(args.root, args.run_name, args.all_checkpoints), env.rank)


if __name__ == "__main__":
    main()

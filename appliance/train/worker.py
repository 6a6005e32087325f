"""One torchrun rank: fetch the run spec and rows from the launcher, run the stage, report back.

Started by `appliance train run --gpus N` (see launch.py); not meant to be run by hand.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    from appliance.hardening import protect_process
    from appliance.train import launch, loop
    from appliance.train.stages import STAGES

    protect_process()  # a rank holds its run's keys and the decrypted weights: no core dump, no /proc reading
    path, ticket = os.environ.pop(launch.ENV_SOCKET, ""), os.environ.pop(launch.ENV_TICKET, "")
    if not path or not ticket:
        print("error: appliance.train.worker is started by `appliance train run --gpus N`", file=sys.stderr)
        return 2
    loop.set_threads()
    link = launch.SocketLink(path, ticket)
    from appliance.errors import ApplianceError

    # torchrun's own numbers until the process group is up: a rank that fails to join it still reports why
    rank, local_rank, dist = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), None
    try:
        try:
            dist = loop.Dist.from_env()
            rank, local_rank = dist.rank, dist.local_rank
            result = STAGES[link.spec.stage](link.spec, link, dist)
        except ApplianceError as e:  # NaN, out of memory: the launcher shows the message and keeps the run
            result = {"status": "failed", "error": e.message, "hint": e.hint}
        except Exception as e:  # anything else, on any rank: one line to the launcher, not a lost traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            result = {"status": "failed", "error": f"rank {rank}: {type(e).__name__}: {first}"[:500],
                      "hint": "fix the cause, then continue with --resume"}
        if local_rank == 0 or result["status"] == "failed":
            link.result(rank, result)
        if result["status"] == "failed":
            return 1
    finally:
        link.close()
        if dist is not None and dist.world > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`flix launch`: torchrun, without torchrun's failure summary.

    flix launch --nproc_per_node 2 -m flix.train scale=smoke mixture=multitask_sw train.parallel=fsdp

Takes torchrun's own arguments. When a process fails, flix's line (said by the first process,
flix.pipeline.tracking.say_once) is the whole message: torchrun would add its agent's error log
and a ChildFailedError traceback of some 30 lines that only repeats the exit code. The exit
code is the first failed process's (128 + N for a signal N, as a shell says it).
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ntorchrun's options: torchrun --help")
        return 0
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several processes, without its 4-line warning
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its "failed (exitcode: 1)" log line
    try:
        run(args)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode or 1
        name = signal.Signals(-failure.exitcode).name
        print(f"flix launch: rank {failure.rank} was stopped by {name}", file=sys.stderr)
        return 128 - failure.exitcode
    except SignalException as err:  # Ctrl-C or a kill reached the launcher: it stopped the processes (each says its own line)
        print(f"flix launch: stopped by {err.sigval.name}", file=sys.stderr)
        return 128 + err.sigval.value
    return 0


if __name__ == "__main__":
    sys.exit(main())

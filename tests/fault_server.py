"""Fork server for ``tests/test_faults.py``: runs ``rapidun`` commands in forked children of one warm interpreter.

A fresh ``python -m rapidun.cli`` spends most of a tiny run importing torch, transformers and peft; the fault
sweep runs the CLI dozens of times, so this process imports them once and forks a child per command. Each child
is a real process (its own pid, files and exit status; SIGKILL kills it and nothing else) that runs
``sys.exit(rapidun.cli.main(argv))`` exactly as ``python -m rapidun.cli`` would: a traceback and status 1 on an
uncaught exception. The parent runs no torch op before forking (one thread, no OpenMP pool), so forking is safe.

Protocol: one JSON object per stdin line, ``{"argv": [...], "env": {name: value or null}, "stdout": file,
"stderr": file}``; the answer is one stdout line ``{"rc": status}`` (``-signal`` for a child killed by a signal).
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def child(req: dict) -> None:
    """Run one command in this (forked) process and exit with its status; never returns."""
    rc = 1
    try:
        for fd, name in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        for k, v in req["env"].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import rapidun.io
        from rapidun import cli

        rapidun.io._FAULT_CALLS = 0  # the parent never reaches a fault point; reset anyway
        try:
            rc = cli.main(req["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def main() -> None:
    # Everything a compare run imports, so the children start warm.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import rapidun.compare
    import rapidun.pipeline
    import rapidun.reporting  # noqa: F401
    from rapidun import cli  # noqa: F401

    torch.set_num_threads(1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(req)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    main()

"""Entrypoint for `ray job submit -- python -m octssl.jobs CONFIG [--set k=v ...] [--resume]`.

Dispatches on the config's ``kind``: ``pretrain``/``finetune`` run the training launcher, ``sweep``
runs the fine-tuning fan-out. The cluster: ``--address``, else ``RAY_ADDRESS`` (set inside a Ray job,
so the job's cluster is used), else a local Ray sized to this machine. Exit status: 0 done, 1 failed
(one line on stderr), 2 a wrong command line (argparse's usage error), 143 stopped cleanly on SIGTERM after a
checkpoint (continue with ``--resume``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from octssl.errors import OctsslError


def main(argv: list[str] | None = None) -> int:
    """Run the job a config names; exit status 1 with one line on an error, 2 on a wrong command line, 143 when
    the run stopped cleanly on SIGTERM (continue with ``--resume``)."""
    parser = argparse.ArgumentParser(prog="python -m octssl.jobs", description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    resuming = parser.add_mutually_exclusive_group()
    resuming.add_argument("--resume", action="store_true",
                        help="continue run.name (a sweep: its name) from its last checkpoint")
    resuming.add_argument(
        "--resume-if-exists", action="store_true",
        help="continue run.name (a sweep: its name) if it exists, else start it (what a retried RayJob wants)",
    )
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--address", default=None,
                        help="the Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)")
    args = parser.parse_args(argv)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address  # what ray_up() joins; the flag wins over the environment


    try:
        kind = (yaml.safe_load(args.config.read_text()) or {}).get("kind", "pretrain")
        resume = "auto" if args.resume_if_exists else args.resume
        if kind == "sweep":
            from octssl.tune.sweep import load_sweep_config, run_sweep

            # plain progress lines in the job's log
            summary = run_sweep(load_sweep_config(args.config, args.overrides), resume=resume).model_dump(mode="json")
        else:
            from octssl.config.job import load_config
            from octssl.train.launch import run

            config = load_config(args.config, args.overrides)
            summary = run(config, resume=resume, metrics_port=args.metrics_port).model_dump(mode="json")
    except (OctsslError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_status if isinstance(err, OctsslError) else 1  # 143: preempted, resumable
    print(yaml.safe_dump(summary, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

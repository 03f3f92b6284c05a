"""Entrypoint for `ray job submit -- python -m octssl.jobs CONFIG [--set k=v ...] [--resume]`.

Dispatches on the config's ``kind``: ``pretrain``/``finetune`` run the training launcher, ``sweep``
runs the fine-tuning fan-out. Inside a Ray job, ``RAY_ADDRESS`` is set, so the job's cluster is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> int:
    """Run the job a config names; exit status 2 with one line on a user error."""
    parser = argparse.ArgumentParser(prog="python -m octssl.jobs", description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue run.name from its last checkpoint")
    parser.add_argument(
        "--resume-if-exists", action="store_true",
        help="continue run.name if it exists, else start it (what a retried RayJob wants)",
    )
    parser.add_argument("--metrics-port", type=int, default=None)
    args = parser.parse_args(argv)

    from octssl.errors import OctsslError

    try:
        kind = (yaml.safe_load(args.config.read_text()) or {}).get("kind", "pretrain")
        if kind == "sweep":
            from octssl.tune.sweep import load_sweep_config, run_sweep

            summary = run_sweep(load_sweep_config(args.config, args.overrides))  # plain progress lines in the job's log
        else:
            from octssl.config.job import load_config
            from octssl.train.launch import run

            config = load_config(args.config, args.overrides)
            resume = "auto" if args.resume_if_exists else args.resume
            summary = run(config, resume=resume, metrics_port=args.metrics_port).model_dump(mode="json")
    except (OctsslError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(summary, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``ptune-search`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Optional, Sequence

from ptune_search.pretrained import PACKAGED_MODELS


def _prepare_model(args: argparse.Namespace) -> None:
    from ptune_search.pretrained import prepare_model

    print(prepare_model(args.alias, args.out))


def _demo(args: argparse.Namespace) -> None:
    from ptune_search.demo import DemoSettings, run_demo

    settings = DemoSettings(
        model=args.model, tuning_mode=args.tuning_mode, pre_seq_len=args.pre_seq_len, steps=args.steps, lr=args.lr
    )
    result = run_demo(settings)
    print(json.dumps(dataclasses.asdict(result)))


def _search(args: argparse.Namespace) -> None:
    from ptune_search.config import load_config
    from ptune_search.search import run_search

    config = load_config(args.config, args.overrides)
    outcome = run_search(config, address=args.address, resume=args.resume)
    print(json.dumps({"best_trial": outcome.best_trial, "baseline_accuracy": outcome.baseline_accuracy,
                      "parent_run_id": outcome.parent_run_id}, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptune-search", description="Prompt-tuning hyperparameter search over a swarm of block servers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare-model", help="convert a packaged model into a Hugging Face folder")
    prepare.add_argument("alias", choices=sorted(PACKAGED_MODELS))
    prepare.add_argument("--out", default=None, help="target folder (default: a cache folder)")
    prepare.set_defaults(run=_prepare_model)

    demo = commands.add_parser("demo", help="a short prompt-tuning run on local blocks")
    demo.add_argument("--model", default="smollm2-135m", help="model folder or packaged alias")
    demo.add_argument("--tuning-mode", default="ptune", choices=["ptune", "deep_ptune"])
    demo.add_argument("--pre-seq-len", type=int, default=16)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.set_defaults(run=_demo)

    swarm = commands.add_parser("swarm", help="run a bootstrap peer, a block server, or a whole local swarm")
    from ptune_search.swarm.__main__ import add_swarm_arguments, run_swarm_command

    add_swarm_arguments(swarm.add_subparsers(dest="command", required=True))
    swarm.set_defaults(run=run_swarm_command)

    search = commands.add_parser("search", help="run the hyperparameter search an experiment config describes")
    search.add_argument("config", help="experiment config (YAML), e.g. experiments/smollm2_bbc_news.yaml")
    search.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set budget.max_steps=20 (repeatable)")
    search.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto) instead of a private one")
    search.add_argument("--resume", action="store_true", help="continue an interrupted search in its output_dir")
    search.set_defaults(run=_search)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, ConnectionError) as error:
        sys.exit(f"ptune-search {args.command}: error: {error}")
    except KeyboardInterrupt:
        print(f"ptune-search {args.command}: interrupted; everything it started is stopped (a search continues with --resume)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

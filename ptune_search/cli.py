"""The ``ptune-search`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Optional, Sequence

from ptune_search.data import TaskDataError
from ptune_search.pretrained import PACKAGED_MODELS
from ptune_search.search.disk_space import OutputDiskFull
from ptune_search.search.report import SearchFailed

# The demo's flags: fields of training.demo.DemoSettings, whose defaults apply to those not given.
DEMO_OPTIONS = ("model", "tuning_mode", "pre_seq_len", "steps", "lr")


def _prepare_model(args: argparse.Namespace) -> None:
    from ptune_search.pretrained import prepare_model

    print(prepare_model(args.alias, args.out))


def _demo(args: argparse.Namespace) -> None:
    from ptune_search.training.demo import DemoSettings, run_demo

    given = {name: getattr(args, name) for name in DEMO_OPTIONS if getattr(args, name) is not None}
    settings = DemoSettings(**given)  # options not given keep DemoSettings' defaults, declared there only
    result = run_demo(settings)
    print(json.dumps(dataclasses.asdict(result)))


def _search(args: argparse.Namespace) -> None:
    from ptune_search.config import load_config
    from ptune_search.search.preflight import check_search

    # before the driver's imports (Ray, MLflow, transformers run subprocesses): a bad search starts nothing
    checked = check_search(load_config(args.config, args.overrides), args.resume)
    from ptune_search.search.driver import run_checked_search

    outcome = run_checked_search(checked, address=args.address)
    baseline = outcome.baseline or {}
    print(
        json.dumps(
            {
                "best_trial": outcome.best_trial,
                "baseline_accuracy": outcome.baseline_accuracy,
                "baseline_test_accuracy": baseline.get("test_accuracy"),
                "baseline_lr": baseline.get("lr"),
                "start_head_test_accuracy": (outcome.start_head or {}).get("test_accuracy"),
                "parent_run_id": outcome.parent_run_id,
            },
            default=str,
        )
    )


def _export(args: argparse.Namespace) -> None:
    if args.out is None and args.register is None:
        raise ValueError("nothing to do: give --out DIR to write the prompt, --register NAME to register it, or both")
    if args.format == "peft" and args.out is None:
        raise ValueError("--format peft writes a folder: give --out DIR")
    printed: dict = {}
    if args.out is not None:
        printed.update(_export_folder(args))
    if args.register is not None:
        printed.update(_register(args, printed.get("source_run_id")))
    print(json.dumps(printed))


def _export_folder(args: argparse.Namespace) -> dict:
    from ptune_search.prompts.export import export_peft_adapter, export_prompt

    export = export_peft_adapter if args.format == "peft" else export_prompt
    result = export(
        args.tracking_uri,
        args.out,
        experiment=args.experiment,
        run_id=args.run_id,
        metric=args.metric,
        mode=args.mode,
        overwrite=args.overwrite,
    )
    manifest = result.manifest
    return {
        "out": str(result.folder),
        "format": args.format,
        "source_run_id": manifest.source_run_id,
        "parent_run_id": manifest.parent_run_id,
        "tuning_mode": manifest.tuning_mode,
        "pre_seq_len": manifest.pre_seq_len,
        manifest.metric.name: manifest.metric.value,
    }


def _register(args: argparse.Namespace, run_id: Optional[str]) -> dict:
    from ptune_search.prompts.export import best_or_named_run
    from ptune_search.prompts.mlflow_model import register_prompt_model

    if run_id is None:
        run_id = best_or_named_run(args.tracking_uri, args.experiment, args.run_id, args.metric, args.mode).info.run_id
    version = register_prompt_model(args.tracking_uri, run_id, args.register, args.metric, args.mode)
    return {
        "source_run_id": run_id,
        "registered_model": version.name,
        "version": version.version,
        "model_uri": f"models:/{version.name}/{version.version}",
    }


def _predict(args: argparse.Namespace) -> None:
    from ptune_search.prompts.predict import PromptClassifier, format_prediction, read_texts

    texts = args.text or read_texts(args.file)
    with PromptClassifier(
        args.prompt,
        model_path=args.model,
        local_blocks=args.local_blocks,
        initial_peers=args.initial_peers,
        peers_file=args.peers_file,
        dht_prefix=args.dht_prefix,
        batch_size=args.batch_size,
    ) as classifier:
        for prediction in classifier.classify(texts):
            print(format_prediction(prediction, as_json=args.json), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptune-search", description="Prompt-tuning hyperparameter search over a swarm of block servers."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_prepare_model, _add_demo, _add_swarm, _add_search, _add_export, _add_predict):
        add_command(commands)
    return parser


def _add_prepare_model(commands: argparse._SubParsersAction) -> None:
    prepare = commands.add_parser("prepare-model", help="convert a packaged model into a Hugging Face folder")
    prepare.add_argument("alias", choices=sorted(PACKAGED_MODELS))
    prepare.add_argument("--out", default=None, help="target folder (default: a cache folder)")
    prepare.set_defaults(run=_prepare_model)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="a short prompt-tuning run on local blocks")
    demo.add_argument("--model", help="model folder or packaged alias")
    demo.add_argument("--tuning-mode", choices=["ptune", "deep_ptune"])
    demo.add_argument("--pre-seq-len", type=int)
    demo.add_argument("--steps", type=int)
    demo.add_argument("--lr", type=float)
    demo.set_defaults(run=_demo)


def _add_swarm(commands: argparse._SubParsersAction) -> None:
    from ptune_search.swarm.__main__ import add_swarm_arguments, run_swarm_command

    swarm = commands.add_parser("swarm", help="run a bootstrap peer, a block server, or a whole local swarm")
    add_swarm_arguments(swarm.add_subparsers(dest="command", required=True))
    swarm.set_defaults(run=run_swarm_command)


def _add_search(commands: argparse._SubParsersAction) -> None:
    search = commands.add_parser("search", help="run the hyperparameter search an experiment config describes")
    search.add_argument("config", help="experiment config (YAML), e.g. experiments/smollm2_bbc_news.yaml")
    search.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set budget.max_steps=20 (repeatable)",
    )
    search.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto) instead of a private one")
    search.add_argument("--resume", action="store_true", help="continue an interrupted search in its output_dir")
    search.set_defaults(run=_search)


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="write the best trial's prompt (or a named run's) to a folder")
    export.add_argument(
        "--tracking-uri", required=True, help="the search's MLflow store, e.g. sqlite:///runs/tiny/mlflow.db"
    )
    export.add_argument("--experiment", default=None, help="MLflow experiment; its latest search is used")
    export.add_argument("--run-id", default=None, help="export this trial run instead of the best one")
    export.add_argument("--metric", default="val_accuracy", help="final metric that ranks the FINISHED trials")
    export.add_argument("--mode", default="max", choices=["max", "min"])
    export.add_argument("--out", default=None, help="folder to write (refused if it exists, unless --overwrite)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.add_argument(
        "--format",
        default="ptune",
        choices=["ptune", "peft"],
        help="ptune: the prompt folder `predict` reads; peft: a PEFT prompt-tuning adapter (ptune mode only)",
    )
    export.add_argument(
        "--register",
        default=None,
        metavar="NAME",
        help="also log the prompt as an MLflow pyfunc model of its search run, registered as a new version of NAME",
    )
    export.set_defaults(run=_export)


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser("predict", help="classify texts with an exported prompt")
    predict.add_argument("--prompt", required=True, help="folder written by `ptune-search export`")
    texts = predict.add_mutually_exclusive_group(required=True)
    texts.add_argument("--text", action="append", help="a text to classify (repeatable)")
    texts.add_argument("--file", help="one text per line (- reads standard input)")
    blocks = predict.add_mutually_exclusive_group(required=True)
    blocks.add_argument("--initial-peers", nargs="+", metavar="MULTIADDR", help="run the blocks on this swarm")
    blocks.add_argument("--peers-file", help="file with the swarm's multiaddrs, one a line (`swarm local` writes one)")
    blocks.add_argument("--local-blocks", action="store_true", help="run the blocks in this process")
    predict.add_argument("--model", default=None, help="checkpoint folder (default: the manifest's model)")
    predict.add_argument("--dht-prefix", default=None, help="the swarm's name for the model (default: its folder name)")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--json", action="store_true", help="one JSON object per text and line")
    predict.set_defaults(run=_predict)


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TaskDataError as error:  # the user's data, refused before anything started: a usage error
        print(f"ptune-search {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError, ConnectionError, OutputDiskFull, SearchFailed) as error:
        sys.exit(f"ptune-search {args.command}: error: {error}")
    except KeyboardInterrupt:
        print(
            f"ptune-search {args.command}: interrupted; everything it started is stopped "
            "(a search continues with --resume)",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()

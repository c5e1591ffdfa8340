from .pipeline import (  # noqa: F401
    EVAL_ROWS_FILE,
    RecipeArguments,
    _Run,
    check_run_settings,
    eval_metric_names,
    paired_comparison,
    push_folder,
    run_cache,
    run_recipe,
    run_values,
    save_config,
    write_outputs,
)

"""What a recipe checks before anything runs: settings that would fail only during training, the peers, the
terms against the task and the tokenizers, and the student's layers against the teacher's depth.

`check_run_settings` runs before the output folder is made; the checks that need the data's tokenizers or the
teacher (`check_across`, `check_one_tokenizer`, `check_student_plan`) run before stage 1.
"""

import math
import os

from transformers import AutoConfig

from ..config import DistillationConfig
from ..launch import check_launch
from ..layer_map import resolve_layer_map
from ..paths import resolve_path
from ..peers import named_peers
from ..student import student_layers
from ..terms import TERMS
from ..terms.runner import TermSet
from .arguments import RecipeArguments


def eval_metric_names(recipe: RecipeArguments, config: DistillationConfig) -> list[str]:
    """What the recipe's evaluation during distillation reports (without the `eval_` prefix)."""
    lm = recipe.task == "causal-lm"
    names = ["loss"]
    if config.task_weight > 0:
        names += ["task", "perplexity"] if lm else ["task"]
    if not lm:
        names.append("accuracy")  # compute_metrics, whatever the weights
    if config.eval_with_teacher:  # otherwise evaluation runs the student alone and reports no term
        names += [f"distill/{spec.name}" for spec in config.term_specs]
    return names


def _check_peers(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """Mutual learning (peer_model_name_or_path) in a recipe: what it cannot take, and peers that cannot be found,
    refused before the teacher is fine-tuned."""
    peers = config.peer_model_name_or_path
    if peers is None:
        return
    if recipe.generations > 1:
        raise ValueError(
            f"peer_model_name_or_path with generations={recipe.generations}: born-again generations are taught by "
            "the generation before, and mutual learning trains the student with its peers instead of a teacher; "
            "set --generations 1, or drop --peer_model_name_or_path."
        )
    if config.teacher_cache_dir:
        raise ValueError(
            "peer_model_name_or_path with teacher_cache_dir: in mutual learning the student learns from its peers, "
            "which train beside it, so no teacher outputs are read; unset --teacher_cache_dir, or drop the peers."
        )
    features = [spec.name for spec in config.term_specs if reads_features(spec)]
    if features:
        raise ValueError(
            f"peer_model_name_or_path: the peers and the student learn from each other's logits, but the terms "
            f"{features} read features (hidden states, attentions or submodules); "
            f"{', '.join(term_fix(n) for n in features)} (logit and dkd "
            "remain), or drop the peers."
        )
    if not config.term_specs:
        raise ValueError(
            "peer_model_name_or_path with logit_weight=0 and no `terms`: nothing would compare the student with its "
            "peers; set --logit_weight 1 (the DML paper's, with --temperature 1 --task_weight 1), or drop the peers."
        )
    for name, source in named_peers(peers).items():
        _check_peer_source(name, source)


def reads_features(spec) -> bool:
    """Whether a term reads more than the models' logits (TermSet.feature_terms), known without the models: a term
    that cannot bind without module names reads submodules."""
    terms = TermSet([spec])
    try:
        terms.bind_module_names((), {})
    except ValueError:
        return True
    return bool(terms.feature_terms())


def reads_logits(spec) -> bool:
    """Whether a term reads the teacher's logits, known without the models (a term that cannot bind without module
    names reads submodules)."""
    terms = TermSet([spec])
    try:
        terms.bind_module_names((), {})
    except ValueError:
        return False
    return terms.needs().logits


def _check_peer_source(name: str, source) -> None:
    """A peer is a folder or a Hub id: a missing folder, or a name neither on disk nor reachable, fails now."""
    if not isinstance(source, str):
        raise ValueError(
            f"peer_model_name_or_path: the peer {name!r} is {source!r}; give a folder written by save_pretrained or "
            "a Hub id."
        )
    try:
        path = resolve_path(source)  # a `pkg:` path whose package or folder is missing fails here
    except ValueError as err:
        raise ValueError(f"peer_model_name_or_path: the peer {name!r}: {err}") from err
    if os.path.isdir(path):
        return
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
        raise ValueError(
            f"peer_model_name_or_path: the peer {name!r} ({source!r}) is no folder"
            f"{' (it is a file)' if os.path.exists(path) else ': there is no such directory'}. Give a folder written "
            "by save_pretrained (or a Hub id)."
        )
    try:  # not a folder here: a Hub id, whose config is fetched (or read from the cache) now
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"peer_model_name_or_path: the peer {name!r} ({source!r}) is neither a folder nor a model hfkd can reach "
            f"on the Hub ({reason}). Check the path or id (HF_HUB_OFFLINE=1 allows only local or cached models)."
        ) from err


def check_run_settings(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """Settings that would only fail during training (at the first evaluation, or in a callback), and launches whose
    processes would train apart (hfkd.launch): checked now."""
    state = config.distributed_state  # joins the launched processes, as the first stage's Trainer would
    check_launch(config, processes=state.num_processes, distributed_type=state.distributed_type)
    _check_offered(config)
    _check_one_teacher(config)
    _check_best_metric(recipe, config)
    _check_early_stopping(recipe, config)
    _check_task_fields(recipe, config)
    _check_report_to(config)
    _check_search(recipe, config)  # before the peers' own checks: with a search, peers are refused as such
    _check_cross_modal(recipe, config)  # before the peers' own checks: across modalities peers are refused as such
    _check_peers(recipe, config)


def _check_search(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """search_trials: what a search cannot run with, refused before anything is loaded or written."""
    if not recipe.search_trials:
        return
    if config.peer_model_name_or_path is not None:
        raise ValueError(
            "search_trials with peer_model_name_or_path: the search tunes how the student learns from a teacher, "
            "but with peers no teacher teaches; set search_trials=0 or drop the peers."
        )
    from ..search import require_optuna

    try:
        require_optuna()
    except ImportError as err:  # bad input of the command line (one line, exit 2), not a bug
        raise ValueError(f"search_trials={recipe.search_trials}: {err}") from None


def check_search_data(recipe: RecipeArguments, train_rows: int, transfer_rows: int = 0) -> None:
    """search_trials: the labelled training rows must leave rows on both sides of the validation part (carved from
    the labelled rows alone: a transfer row has no label to score a trial on)."""
    if not recipe.search_trials:
        return
    labelled = train_rows - transfer_rows
    validation = math.ceil(recipe.search_validation_fraction * labelled)  # as datasets' train_test_split counts
    if validation < 1 or labelled - validation < 1:
        kind = "labelled training rows" if transfer_rows else "training rows"
        raise ValueError(
            f"search_validation_fraction={recipe.search_validation_fraction} of {labelled} {kind} leaves "
            f"{validation} validation and {labelled - validation} {kind} for the search's trials; both need at "
            f"least one. Give more {kind} or another search_validation_fraction."
        )


def _check_offered(config: DistillationConfig) -> None:
    """DistillationTrainer's fields that a recipe does not offer."""
    if config.teacher_ema_decay is not None:
        raise ValueError(
            "teacher_ema_decay (a mean teacher made from the student) is not offered by the `hfkd distill` recipes "
            "yet: they distil from the recipe's teacher. Unset it, or use it from Python: "
            "DistillationTrainer(model=student, args=DistillationConfig(teacher_ema_decay=0.999, ...))."
        )
    if config.teacher_processing_class is not None:
        raise ValueError(
            "teacher_processing_class: a recipe reads the teacher's tokenizer from teacher_model_name_or_path and the "
            "student's from student_model_name_or_path, and tokenizes for both when they differ; unset "
            "teacher_processing_class (it is for DistillationTrainer in Python)."
        )


def _check_one_teacher(config: DistillationConfig) -> None:
    """A recipe has one teacher: settings for several are refused now, not after the teacher is fine-tuned."""
    several = [
        name
        for name, given in (
            ("teacher_model_name_or_path", isinstance(config.teacher_model_name_or_path, (list, dict))),
            ("teacher_cache_dir", isinstance(config.teacher_cache_dir, (list, dict))),
            ("teacher_weights", config.teacher_weights is not None),
            ("teacher_combine", config.teacher_combine != "weights"),
        )
        if given
    ]
    if several:
        raise ValueError(
            f"{', '.join(several)} set for several teachers, but a recipe distils from one (it fine-tunes, evaluates "
            "and describes it); for several teachers use DistillationTrainer(teacher_model=[...]) in Python."
        )


def _check_best_metric(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """metric_for_best_model must be one that the recipe's evaluation reports, ordered the right way."""
    metric = config.metric_for_best_model
    if metric:
        name = metric[len("eval_") :] if metric.startswith("eval_") else metric
        valid = eval_metric_names(recipe, config)
        if name not in valid:
            raise ValueError(
                f"metric_for_best_model={metric!r} is not reported by this recipe's evaluation; it reports "
                f"{valid}. Set --metric_for_best_model to one of them."
            )
        if name == "perplexity" and config.greater_is_better:
            raise ValueError(
                "metric_for_best_model=perplexity: lower is better, but greater_is_better is true (transformers' "
                "default for names not ending in 'loss'). Pass --greater_is_better false."
            )


def _check_early_stopping(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """Early stopping watches metric_for_best_model at each evaluation: what it needs is refused missing now."""
    if recipe.early_stopping_patience:
        missing = [
            need
            for need, ok in (
                ("--eval_strategy steps (or epoch)", config.eval_strategy != "no"),
                ("--load_best_model_at_end true", config.load_best_model_at_end),
                ("--metric_for_best_model <name>", bool(config.metric_for_best_model)),
            )
            if not ok
        ]
        if missing:
            raise ValueError(
                f"early_stopping_patience={recipe.early_stopping_patience} needs {', '.join(missing)}: early "
                "stopping watches the metric at each evaluation."
            )


def _check_report_to(config: DistillationConfig) -> None:
    """A logging integration that is not installed would fail when training starts."""
    from transformers import integrations

    for name in config.report_to or []:
        available = getattr(integrations, f"is_{name}_available", None)
        if available is not None and not available():
            extra = "pip install 'hfkd[tensorboard]'" if name == "tensorboard" else f"pip install {name}"
            raise ValueError(
                f"report_to includes {name!r}, which is not installed: {extra}, or drop it from report_to."
            )


def term_fix(name: str) -> str:
    """The command-line change that turns a term off."""
    short = TERMS[name].short_form
    return f"--{short['weight']} 0" if short else f"drop {name!r} from --terms"


def _check_task_fields(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """Fields the recipe's task cannot use, which DistillationTrainer would refuse only after the teacher is
    fine-tuned (stage 1): refused now, with the command-line fix."""
    lm = recipe.task == "causal-lm"
    if not lm:
        generation = [f for f, on in (("--lmbda", config.lmbda > 0), ("--seq_kd", config.seq_kd)) if on]
        if generation:
            raise ValueError(
                f"{' and '.join(generation)}: on-policy distillation (lmbda) and sequence-level KD (seq_kd) make a "
                f"model generate text, which needs task=causal-lm; this recipe's task is {recipe.task}. Pass "
                f"{' and '.join(f'{f} 0' if f == '--lmbda' else f'{f} false' for f in generation)}."
            )
        lm_terms = [spec.name for spec in config.term_specs if spec.name in ("span_kd", "uld")]
        if lm_terms:
            raise ValueError(
                f"--terms {lm_terms}: these compare next-token distributions of causal LMs (task=causal-lm), and "
                f"this recipe's task is {recipe.task}; {', '.join(term_fix(n) for n in lm_terms)}. A classifier "
                "distils with logit (--logit_weight), hidden (--hidden_weight) and the relation terms, also across "
                "tokenizers."
            )
    # DistillationTrainer's fields for tokenizing text rows in Python: a recipe tokenizes its own data.
    ignored = [
        (name, flag)
        for name, flag in (
            ("tokenize_text_column", "--text_column"),
            ("tokenize_text_pair_column", "--text_pair_column"),
            ("tokenize_max_length", "--max_length"),
        )
        if getattr(config, name) != DistillationConfig.__dataclass_fields__[name].default
    ]
    if ignored:
        raise ValueError(
            f"{', '.join('--' + n for n, _ in ignored)}: these are for DistillationTrainer with "
            "teacher_processing_class in Python; a recipe tokenizes its data itself, for both models when the "
            f"student has its own tokenizer. Unset them, and use {', '.join(f for _, f in ignored)}."
        )


def check_across(recipe: RecipeArguments, config: DistillationConfig, student_tokenizer, tokenizer) -> None:
    """What cannot run when the student has its own tokenizer, refused before anything is tokenized or trained."""
    c, r = config, recipe
    own = (
        f"student_model_name_or_path={r.student_model_name_or_path!r} has its own tokenizer "
        f"({len(student_tokenizer)} tokens; the teacher's has {len(tokenizer)})"
    )
    if c.teacher_cache_dir:
        raise ValueError(
            f"teacher_cache_dir: {own}, but a teacher cache stores outputs over the teacher's tokenization alone, "
            "without the spans that line it up with the student's. Unset --teacher_cache_dir (the teacher runs "
            "online), or use a student with the teacher's tokenizer."
        )
    if c.peer_model_name_or_path is not None:
        raise ValueError(
            f"peer_model_name_or_path: {own}; deep mutual learning needs the peers and the student to share one "
            "tokenizer. Drop --peer_model_name_or_path, or use a student with the teacher's tokenizer."
        )
    if r.generations > 1:
        raise ValueError(
            f"generations={r.generations}: {own}; born-again generations are not offered across tokenizers yet. "
            "Set --generations 1."
        )
    if c.lmbda > 0 or c.seq_kd:
        raise ValueError(
            f"{'--lmbda' if c.lmbda > 0 else '--seq_kd'}: {own}; on-policy distillation and sequence-level KD "
            "are not offered across tokenizers yet. Set --lmbda 0 --seq_kd false, or use a student with the "
            "teacher's tokenizer."
        )
    lm = r.task == "causal-lm"
    names = [spec.name for spec in c.term_specs]
    positional = [n for n in names if not TERMS[n].across_tokenizers or (lm and n in ("logit", "dkd"))]
    lm_only = [n for n in names if not lm and n in ("span_kd", "uld")]
    usable = (
        'span_kd or uld (--terms \'[{"name": "span_kd"}]\') with the task loss'
        if lm
        else "logit, hidden (over aligned spans) and the relation terms (rkd, sp, pkt, crd, pkd)"
    )
    for refused, why in (
        (positional, "compare the two models token position by token position or id by id"),
        (lm_only, "compare next-token distributions of causal LMs, and this task has class logits"),
    ):
        if refused:
            raise ValueError(
                f"{own}, and the terms {refused} {why}; {', '.join(term_fix(n) for n in refused)}. Across "
                f"tokenizers use {usable}."
            )


def check_one_tokenizer(config: DistillationConfig) -> None:
    """The cross-tokenizer terms, when the student reads the teacher's tokens: refused before stage 1."""
    names = [spec.name for spec in config.term_specs if spec.name in ("span_kd", "uld")]
    if names:
        raise ValueError(
            f"--terms {names}: these line up two different tokenizations, but the student reads the teacher's "
            f"tokens (it is built from the teacher, or its tokenizer is the teacher's); "
            f"{', '.join(term_fix(n) for n in names)} and distil with --logit_weight, or give "
            "--student_model_name_or_path a student with its own tokenizer."
        )


def check_student_plan(recipe: RecipeArguments, config: DistillationConfig, teacher, student_config=None) -> None:
    """The student's layers against the teacher's depth, before the teacher is fine-tuned; `student_config`: the
    config of a student built from student_config."""
    r = recipe
    if student_config is not None:
        depth = getattr(student_config.get_text_config(), "num_hidden_layers", None)
        if isinstance(depth, int) and not getattr(student_config, "is_encoder_decoder", False):
            _check_layer_maps(config, teacher, depth)
    elif not r.student_model_name_or_path:
        layers = r.layer_list()
        kept = student_layers(teacher, num_layers=None if layers else r.student_num_layers, layers=layers)
        if len(kept) == 1:  # one stack of layers (not an encoder-decoder's two)
            _check_layer_maps(config, teacher, len(kept[0]))


def _check_layer_maps(config: DistillationConfig, teacher, student_depth: int) -> None:
    """Explicit hidden/attention layer maps against both depths (a student built from the teacher's layers, of
    a model with one stack of layers), which the trainer would check only after stage 1."""
    teacher_depth = getattr(teacher.config, "num_hidden_layers", None)
    if not isinstance(teacher_depth, int) or getattr(teacher.config, "is_encoder_decoder", False):
        return
    for spec in config.term_specs:
        layer_map = spec.options.get("layer_map")
        if spec.name not in ("hidden", "attention") or isinstance(layer_map, str) or layer_map is None:
            continue
        field_name = f"{spec.name}_layer_map"
        # hidden_states hold the embeddings' output first: one entry more than layers.
        extra = 1 if spec.name == "hidden" else 0
        try:
            resolve_layer_map(
                layer_map,
                student_depth + extra,
                teacher_depth + extra,
                field_name=f"--{field_name}",
                has_embeddings=bool(extra),
            )
        except ValueError as err:
            raise ValueError(
                f"{str(err).rstrip('.')} (the student keeps {student_depth} of the teacher's {teacher_depth} layers)."
            ) from None


def check_cache_settings(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """`hfkd distill` with a teacher cache: the cached teacher must be final."""
    if config.teacher_cache_dir and recipe.finetune_teacher:
        raise ValueError(
            "teacher_cache_dir with finetune_teacher=true: the cache holds the outputs of a teacher that is final. "
            "Fine-tune first (a run without the cache), cache its teacher/ folder with hfkd cache, then distil with "
            "--teacher_model_name_or_path <run>/teacher --finetune_teacher false --teacher_cache_dir <cache>."
        )


def check_cache_run(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """`hfkd cache`: what has no teacher outputs to store, refused before the data is read."""
    if config.peer_model_name_or_path is not None:
        raise ValueError(
            "peer_model_name_or_path: in deep mutual learning the student learns from its peers, which train beside "
            "it, so there are no teacher outputs to cache; drop --peer_model_name_or_path, or run hfkd distill with "
            "the peers (no cache)."
        )
    if recipe.student_modality is not None:
        raise ValueError(
            f"student_modality={recipe.student_modality!r}: a teacher cache is not offered across modalities yet; "
            "distil without a cache (hfkd distill runs the teacher online)."
        )
    if recipe.finetune_teacher:
        raise ValueError(
            "finetune_teacher=true: the cache must hold the fine-tuned teacher's outputs. Fine-tune it first (e.g. "
            "`hfkd distill` with this recipe), then cache with --teacher_model_name_or_path <output_dir>/teacher "
            "--finetune_teacher false."
        )


def check_cache_tokenizer(recipe: RecipeArguments, across: bool) -> None:
    """`hfkd cache` for a student with its own tokenizer (`across`, known once the tokenizers are read)."""
    if across:
        raise ValueError(
            f"student_model_name_or_path={recipe.student_model_name_or_path!r} has its own tokenizer: a teacher cache "
            "stores outputs over the teacher's tokenization alone, which cannot teach it. Distil without a cache "
            "(hfkd distill runs the teacher online), or use a student with the teacher's tokenizer."
        )


def check_transfer_settings(recipe: RecipeArguments, data_args) -> None:
    """Transfer rows (rows trained on the distillation terms alone) are a classifier's: a causal LM's labels are
    its own text, so no row of it lacks one. Refused before the output folder is made."""
    options = data_args.transfer_options()
    if options and recipe.task == "causal-lm":
        raise ValueError(
            f"{', '.join(options)}: transfer rows are rows without a label, and a causal LM's labels are its own "
            "text, so every row is labelled. Unset them, and add the extra text to data_files instead."
        )


def check_labelled_rows(recipe: RecipeArguments, data_args, labelled: int, transfer: int) -> None:
    """The stages that train on labels alone, against a run whose training rows hold none: refused once the data is
    split into labelled and transfer rows, before anything is tokenized or trained."""
    if labelled:
        return
    why = (
        f"labelled_train_samples={data_args.labelled_train_samples}"
        if data_args.labelled_train_samples == 0
        else "no training row has a label"
    )
    for needed, flag, what in (
        (recipe.finetune_teacher, "--finetune_teacher false", "teacher fine-tuning trains on the labelled rows"),
        (
            recipe.compare_without_distillation,
            "--compare_without_distillation false",
            "the labels-only comparison trains the student on the labelled rows alone",
        ),
    ):
        if needed:
            raise ValueError(
                f"{what}, but this run has none ({why}; {transfer} transfer rows). Give labelled rows (raise "
                f"labelled_train_samples, or fix the data's label_column), or pass {flag}."
            )


def _check_cross_modal(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """A student that reads another modality (student_modality): what cannot run across modalities, refused before
    the output folder is made."""
    c, r = config, recipe
    if r.student_modality is None:
        return
    own = f"student_modality={r.student_modality!r} (the teacher reads text, the student {r.student_modality})"
    for refused, fix in (
        (c.teacher_cache_dir, "unset --teacher_cache_dir (the teacher runs online)"),
        (c.peer_model_name_or_path is not None, "drop --peer_model_name_or_path"),
        (r.generations > 1, "set --generations 1"),
        (r.search_trials, "set --search_trials 0"),
        (c.augment, "unset --augment: a view of one modality would not change the other's"),
        (
            c.train_sampling_strategy == "group_by_length",
            "drop --train_sampling_strategy group_by_length (distillation's rows hold raw text and audio)",
        ),
    ):
        if refused:
            raise ValueError(f"{own}: not offered across modalities yet; {fix}.")
    names = [spec.name for spec in c.term_specs]
    positional = [n for n in names if not TERMS[n].across_modalities]
    if positional:
        raise ValueError(
            f"{own}, and the terms {positional} compare positions (tokens, audio frames) or their features, which "
            f"the two modalities do not share; {', '.join(term_fix(n) for n in positional)}. Across modalities use "
            "logit (--logit_weight) or dkd, which compare each row's class distribution."
        )


def check_student_audio(data_args, student_processor) -> None:
    """The student's feature extractor against the data's audio, before anything is preprocessed or trained."""
    rate = getattr(student_processor, "sampling_rate", None)
    if rate is not None and int(rate) != data_args.audio_sampling_rate:
        raise ValueError(
            f"audio_sampling_rate={data_args.audio_sampling_rate}: the data's audio is at "
            f"{data_args.audio_sampling_rate} Hz, but student_processor ({type(student_processor).__name__}) "
            f"expects {rate} Hz. Resample the audio to {rate} Hz and set --audio_sampling_rate {rate}, or give a "
            "student_processor made for the data's rate."
        )

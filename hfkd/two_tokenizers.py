"""Batches for a teacher and a student that do not share a tokenizer: both tokenizations of the same text.

`DistillationTrainer(..., teacher_processing_class=teacher_tokenizer)` (or `DistillationConfig
.teacher_processing_class`) collates with `TwoTokenizerCollator` unless given another collator, so the rows of the
data set stay text: a `text` column (`DistillationConfig.tokenize_text_column` names another, and
`tokenize_text_pair_column` a second text for pair tasks), or `prompt` and `completion` texts for causal LMs. Rows may also come tokenized
already by `tokenize_for_both` through `datasets.Dataset.map` (what the recipes do), which is faster over epochs.

Each batch holds the student's tokenization as usual (`input_ids`, `attention_mask`, ... and `labels`), the
teacher's under the `teacher_` prefix (`teacher_input_ids`, `teacher_attention_mask`: hfkd.batch gives the teacher
those in place of the student's), and the spans that line the two up (`hfkd_spans`, `hfkd_teacher_spans`, from
`hfkd.alignment.align_spans` on the character offsets) which the cross-tokenizer terms read: `uld` and `span_kd`
for causal LMs' logits, and `hidden` on span-averaged features.

Causal LMs: `labels` are the student's `input_ids` (-100 on padding and on the prompt); a span counts when a logit
predicts every token of it on both sides (position >= 1) and it lies in the completion.
"""

import logging
import os
from collections.abc import Sequence

import torch

from .alignment import align_spans
from .batch import SPANS, TEACHER_PREFIX, TEACHER_SPANS
from .models import unwrap_peft
from .on_policy import is_causal_lm

logger = logging.getLogger(__name__)

# Columns tokenize_for_both writes besides the tokenizers' own outputs.
_PADDED = {SPANS: -1, TEACHER_SPANS: -1, "labels": -100}


def _fast(tokenizer, role: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The {role} tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: lining up two tokenizations "
            "needs each token's character offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )


def _encode(tokenizer, text: str, pair: str | None, max_length: int | None) -> dict:
    out = tokenizer(
        text,
        pair,
        truncation=max_length is not None,
        max_length=max_length,
        return_offsets_mapping=True,
    )
    offsets = [tuple(o) for o in out.pop("offset_mapping")]
    if pair is not None:
        # The pair's offsets count from its own start: place it after the first text so that spans never mix them.
        which = out.sequence_ids()
        shift = len(text) + 1
        offsets = [(s + shift, e + shift) if w == 1 else (s, e) for (s, e), w in zip(offsets, which, strict=True)]
    return {**{k: list(v) for k, v in out.items()}, "offsets": offsets}


def tokenize_for_both(
    row: dict,
    student_tokenizer,
    teacher_tokenizer,
    max_length: int | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    causal_lm: bool = False,
) -> dict:
    """One row's text in both tokenizations, with the spans between them (for `Dataset.map`, unbatched).

    Args:
        row: a `text_column` text (and `text_pair_column`), or for causal LMs `prompt` and `completion` texts (the
            completion continues the prompt's text as is). Other columns are left to `map` (e.g. labels).
        max_length: tokens per side at most (each side truncated on its own; text that only one side covers is in
            no span).
        causal_lm: add `labels` (the student's ids, -100 on the prompt) and count only spans a logit predicts.
    Returns:
        the student tokenizer's outputs, the teacher's with the `teacher_` prefix, `hfkd_spans`,
        `hfkd_teacher_spans` (span id per token, -1 outside), and `labels` for causal LMs.
    """
    _fast(student_tokenizer, "student")
    _fast(teacher_tokenizer, "teacher")
    prompt_chars = 0
    pair = None
    if "messages" in row and causal_lm:
        raise ValueError(
            "Across tokenizers, rows must be plain text (a text column, or prompt and completion texts): each model's "
            "chat template writes a conversation differently. Render `messages` to text first."
        )
    if causal_lm and "prompt" in row and "completion" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise ValueError("Across tokenizers, `prompt` and `completion` must be texts (not lists of messages).")
        text = row["prompt"] + row["completion"]
        prompt_chars = len(row["prompt"])
    else:
        if text_column not in row:
            raise ValueError(
                f"Rows need a {text_column!r} text to tokenize for both models, got columns {sorted(row)}; name the "
                "column that holds the text (DistillationConfig.tokenize_text_column, or text_column= of "
                "TwoTokenizerCollator / tokenize_for_both), or give causal LMs `prompt` and `completion` texts."
            )
        text = row[text_column]
        pair = row[text_pair_column] if text_pair_column else None
    student = _encode(student_tokenizer, text, pair, max_length)
    teacher = _encode(teacher_tokenizer, text, pair, max_length)
    s_off, t_off = student.pop("offsets"), teacher.pop("offsets")
    s_keep = t_keep = None
    if causal_lm:
        # A span counts when a logit predicts each of its tokens (not position 0) and it lies in the completion.
        s_keep = [i > 0 and end > prompt_chars for i, (_, end) in enumerate(s_off)]
        t_keep = [j > 0 and end > prompt_chars for j, (_, end) in enumerate(t_off)]
    s_spans, t_spans = align_spans(s_off, t_off, s_keep, t_keep)
    out = {**student, **{TEACHER_PREFIX + k: v for k, v in teacher.items()}, SPANS: s_spans, TEACHER_SPANS: t_spans}
    if causal_lm:
        # The prompt's tokens are never a target (a token ending past the prompt's text belongs to the completion).
        out["labels"] = [
            tok if end > prompt_chars else -100 for tok, (_, end) in zip(student["input_ids"], s_off, strict=True)
        ]
    return out


class TwoTokenizerCollator:
    """Pads rows of `tokenize_for_both` (or tokenizes text rows first) into batches for both models.

    Args:
        student_tokenizer / teacher_tokenizer: fast tokenizers (character offsets); each pads its own side on the
            right, with its own pad token.
        max_length, text_column, text_pair_column, causal_lm: as in `tokenize_for_both`, for text rows.
        pad_to_multiple_of: passed to both tokenizers' `pad`.
    """

    def __init__(
        self,
        student_tokenizer,
        teacher_tokenizer,
        max_length: int | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        causal_lm: bool = False,
        pad_to_multiple_of: int | None = None,
    ):
        for role, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            _fast(tok, role)
            if tok.pad_token_id is None:
                raise ValueError(
                    f"The {role} tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = "
                    "tokenizer.eos_token (padding positions are masked)."
                )
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.max_length = max_length
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.causal_lm = causal_lm
        self.pad_to_multiple_of = pad_to_multiple_of
        self._text_columns = {text_column, text_pair_column, "prompt", "completion"} - {None}
        if causal_lm:  # read only to refuse them clearly (tokenize_for_both)
            self._text_columns.add("messages")

    def text_columns(self) -> set[str]:
        """The columns this collator reads text from (Trainer must not drop them as unused)."""
        return set(self._text_columns)

    def __call__(self, features: Sequence[dict]) -> dict:
        rows = []
        for feature in features:
            feature = dict(feature)
            if SPANS not in feature:
                encoded = tokenize_for_both(
                    feature,
                    self.student_tokenizer,
                    self.teacher_tokenizer,
                    self.max_length,
                    self.text_column,
                    self.text_pair_column,
                    self.causal_lm,
                )
                feature = {k: v for k, v in feature.items() if k not in self._text_columns and k != "messages"}
                feature.update(encoded)
            rows.append(feature)
        student_keys = [k for k in rows[0] if k not in _PADDED and not k.startswith(TEACHER_PREFIX)]
        token_keys = [k for k in student_keys if isinstance(rows[0][k], (list, tuple))]
        teacher_keys = [k for k in rows[0] if k.startswith(TEACHER_PREFIX)]
        batch = dict(
            self.student_tokenizer.pad(
                [{k: r[k] for k in token_keys} for r in rows],
                padding=True,
                pad_to_multiple_of=self.pad_to_multiple_of,
                padding_side="right",  # rows start at position 0, as the spans and labels assume
                return_tensors="pt",
            )
        )
        teacher = self.teacher_tokenizer.pad(
            [{k[len(TEACHER_PREFIX) :]: r[k] for k in teacher_keys} for r in rows],
            padding=True,
            pad_to_multiple_of=self.pad_to_multiple_of,
            padding_side="right",
            return_tensors="pt",
        )
        batch.update({TEACHER_PREFIX + k: v for k, v in teacher.items()})
        widths = {SPANS: batch["input_ids"].shape[1], TEACHER_SPANS: batch[TEACHER_PREFIX + "input_ids"].shape[1]}
        widths["labels"] = widths[SPANS]
        for key, fill in _PADDED.items():
            if key not in rows[0]:
                continue
            value = rows[0][key]
            if isinstance(value, (list, tuple)):
                batch[key] = torch.full((len(rows), widths[key]), fill, dtype=torch.long)
                for i, r in enumerate(rows):
                    batch[key][i, : len(r[key])] = torch.tensor(r[key], dtype=torch.long)
            else:  # class labels
                batch[key] = torch.tensor([r[key] for r in rows])
        for key in student_keys:
            if key not in token_keys:  # per-row values: class labels, row ids, teacher ids
                batch[key] = torch.tensor([r[key] for r in rows])
        if "label" in batch and "labels" not in batch:
            batch["labels"] = batch.pop("label")
        return batch


def load_teacher_tokenizer(value):
    """`teacher_processing_class` as given: a tokenizer, or a Hub id / local path ('pkg:' paths too) to load."""
    if not isinstance(value, str):
        return value
    from transformers import AutoTokenizer

    from .paths import resolve_path

    try:
        return AutoTokenizer.from_pretrained(resolve_path(value))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load teacher_processing_class={value!r} with AutoTokenizer: {err}\nGive the teacher's "
            "tokenizer as a Hub id or a local folder."
        ) from err


def check_teacher_tokenizer(tokenizer, teacher) -> None:
    """The teacher's tokenizer must produce ids its embedding holds: a mismatch would index out of range (or, worse,
    read the wrong rows) at the first step."""
    embeddings = teacher.get_input_embeddings() if hasattr(teacher, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        rows = getattr(getattr(teacher, "config", None), "vocab_size", None)
    size = len(tokenizer)
    if rows is not None and size > rows:
        raise ValueError(
            f"teacher_processing_class has {size} tokens but the teacher's embedding holds {rows}: it is not the "
            "teacher's tokenizer. Pass the tokenizer the teacher was trained with (usually the one saved beside it)."
        )


# A text that exercises case, punctuation, digits, accents, other scripts and emoji: two tokenizers that agree on it
# give the same ids on ordinary text.
PROBE_TEXT = "Hello, World! The quick brown fox jumps over 13 lazy dogs; naïve café, Straße, 東京 🙂."
# Files one of which a saved tokenizer always has. (AutoTokenizer on a folder with only config.json builds an empty
# tokenizer of the model's type instead of failing, so the files are looked for first.)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)


def _source(model) -> str | None:
    """Where a model was loaded from (`name_or_path`: a folder or a Hub id), or None for one built from a config."""
    base = unwrap_peft(model) if model is not None else None
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _same_files(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


# Files a Hub tokenizer nearly always has, fetched to learn whether a Hub teacher has a tokenizer of its own: loading a
# model from the Hub does not download its tokenizer, so an empty cache does not mean there is none.
_HUB_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _hub_file(repo_id: str, name: str) -> bool:
    """Whether the Hub repo has `name`, downloading it (from the cache first; HF_HUB_OFFLINE=1 allows only the cache)."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, name)
    except Exception:  # noqa: BLE001 - missing, offline and not cached, or not a repo id: not to be found
        return False
    return True


def _has_tokenizer_files(source: str) -> bool:
    if os.path.isdir(source):
        return any(os.path.isfile(os.path.join(source, name)) for name in _TOKENIZER_FILES)
    try:  # a Hub id: what is cached, else its usual tokenizer files from the Hub
        from huggingface_hub import try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache(source, name), str) for name in _TOKENIZER_FILES):
            return True
    except Exception:  # noqa: BLE001 - not a valid repo id
        return False
    return any(_hub_file(source, name) for name in _HUB_TOKENIZER_FILES)


def own_tokenizer(model):
    """The tokenizer saved beside a model (in its folder, or its Hub repo for a Hub id: from the cache, else
    downloaded unless HF_HUB_OFFLINE=1); None when it has none to be found."""
    source = _source(model)
    if source is None or not _has_tokenizer_files(source):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception:  # noqa: BLE001 - any failure to load it means there is no tokenizer to compare with
        return None


def _text_tokenizer(processing_class):
    """The text tokenizer in `processing_class` (a tokenizer, or a processor holding one), else None."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(processing_class, PreTrainedTokenizerBase):
        return processing_class
    inner = getattr(processing_class, "tokenizer", None)
    return inner if isinstance(inner, PreTrainedTokenizerBase) else None


def _describe_tokenizer(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "built in memory"
    return f"{type(tokenizer).__name__} {name!r}, {len(tokenizer):,} tokens"


def check_same_tokenizer(processing_class, student, teacher, role: str = "teacher") -> None:
    """A teacher without `teacher_processing_class` reads the student's token ids: refused when the tokenizer saved
    beside it tokenizes a probe text otherwise than the student's (`processing_class`, else the one saved beside the
    student). A teacher with no tokenizer of its own to be found gets one warning line; image models, and a teacher
    loaded from the same place as the student's tokenizer, pass without a look."""
    if getattr(teacher, "main_input_name", "input_ids") != "input_ids":
        return  # pixels, audio: no token ids
    student_tokenizer = _text_tokenizer(processing_class)
    if student_tokenizer is None:
        if processing_class is not None:
            return  # an image processor or feature extractor: the student does not read token ids
        student_tokenizer = own_tokenizer(student)
        if student_tokenizer is None:
            return  # nothing tells what the data was tokenized with
    teacher_source = _source(teacher)
    if _same_files(teacher_source, getattr(student_tokenizer, "name_or_path", None)):
        return  # the teacher's own folder or Hub id: the same files
    teacher_tokenizer = own_tokenizer(teacher)
    if teacher_tokenizer is None:
        logger.warning(
            "The %s (%s%s) has no tokenizer of its own that hfkd can find, so it reads the student's token ids "
            "(%s); if it was trained with another tokenizer, pass teacher_processing_class.",
            role,
            type(teacher).__name__,
            f", from {teacher_source!r}" if teacher_source else ", built from a config",
            _describe_tokenizer(student_tokenizer),
        )
        return
    try:
        ids = list(student_tokenizer(PROBE_TEXT)["input_ids"])
        teacher_ids = list(teacher_tokenizer(PROBE_TEXT)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot read the probe text: nothing to compare
        return
    if ids == teacher_ids:
        return
    raise ValueError(
        f"The {role} ({type(teacher).__name__}, from {teacher_source!r}) has its own tokenizer "
        f"({_describe_tokenizer(teacher_tokenizer)}), which tokenizes text otherwise than the student's "
        f"({_describe_tokenizer(student_tokenizer)}): {PROBE_TEXT!r} is {teacher_ids[:8]}... for the {role}, "
        f"{ids[:8]}... for the student. Without teacher_processing_class the {role} would read the student's "
        f"token ids as its own. Pass teacher_processing_class=<the {role}'s tokenizer or its folder> to "
        "DistillationTrainer (or DistillationConfig.teacher_processing_class): hfkd then tokenizes each text row for "
        "both models and lines them up. With `hfkd distill`, the teacher's tokenizer comes from "
        "teacher_model_name_or_path and a student with its own saves it beside student_model_name_or_path."
    )


def check_terms_across_tokenizers(terms: dict) -> None:
    """Refuses terms that compare positions one to one when the teacher has its own tokenizer."""
    refused = [name for name, term in terms.items() if not type(term).across_tokenizers]
    if refused:
        raise ValueError(
            f"The terms {refused} compare the two models token position by token position, which a teacher with its "
            "own tokenizer (teacher_processing_class) does not share with the student. Across tokenizers use logit "
            "(classifiers), span_kd or uld (causal LMs), hidden (over spans) and the relation terms (rkd, sp, pkt, "
            "crd, pkd); drop the others (e.g. attention_weight=0)."
        )


def setup_teacher_tokenizer(model, args, given, source, trainer_args: tuple, trainer_kwargs: dict):
    """A teacher with its own tokenizer (`teacher_processing_class`): loads and checks it, and collates with
    TwoTokenizerCollator unless a collator is given (set in `trainer_kwargs`). Without one, checks that every teacher
    reads the student's token ids. Returns the teacher's tokenizer, or None."""
    value = given if given is not None else args.teacher_processing_class
    if value is None:
        student_tokenizer = trainer_kwargs.get("processing_class")
        if student_tokenizer is None and len(trainer_args) > 3:  # Trainer's 6th positional argument
            student_tokenizer = trainer_args[3]
        source.check_tokenizers(student_tokenizer, model)
        return None
    for name, present in (
        (source.described_as, source.described_as is not None),
        ("lmbda > 0 or seq_kd", args.lmbda > 0 or args.seq_kd),
    ):
        if present:
            raise ValueError(
                f"teacher_processing_class (a teacher with its own tokenizer) cannot be combined with {name} yet; "
                "drop one of them."
            )
    tokenizer = load_teacher_tokenizer(value)
    for teacher in source.models().values():
        check_teacher_tokenizer(tokenizer, teacher)
    if len(trainer_args) == 0 and trainer_kwargs.get("data_collator") is None:
        student_tokenizer = trainer_kwargs.get("processing_class")
        if student_tokenizer is None:
            raise ValueError(
                "teacher_processing_class is set: pass the student's tokenizer as processing_class too, so that "
                "hfkd tokenizes each text row for both models."
            )
        causal_lm = model is not None and is_causal_lm(unwrap_peft(model))
        for which in ("train_dataset", "eval_dataset"):
            check_text_column(trainer_kwargs.get(which), which, args, causal_lm)
        trainer_kwargs["data_collator"] = TwoTokenizerCollator(
            student_tokenizer,
            tokenizer,
            max_length=args.tokenize_max_length,
            text_column=args.tokenize_text_column,
            text_pair_column=args.tokenize_text_pair_column,
            causal_lm=causal_lm,
        )
    return tokenizer


def check_text_column(dataset, which: str, args, causal_lm: bool) -> None:
    """Text rows that TwoTokenizerCollator will tokenize for both models need their text column; checked against the
    dataset's own columns before Trainer drops the ones the student's forward does not take."""
    if isinstance(dataset, dict):
        for name, one in dataset.items():
            check_text_column(one, f"{which}[{name!r}]", args, causal_lm)
        return
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list) or TEACHER_PREFIX + "input_ids" in columns:
        return  # not a datasets.Dataset, or rows already tokenized for both (tokenize_for_both)
    if causal_lm and (("prompt" in columns and "completion" in columns) or "messages" in columns):
        return  # prompt-completion rows; conversations are refused by the collator, with what to do
    wanted = [c for c in (args.tokenize_text_column, args.tokenize_text_pair_column) if c and c not in columns]
    if wanted:
        field_names = ["tokenize_text_column"] if args.tokenize_text_column in wanted else []
        field_names += ["tokenize_text_pair_column"] if args.tokenize_text_pair_column in wanted else []
        raise ValueError(
            f"{which} has no {' or '.join(map(repr, wanted))} column to tokenize for both models (teacher_processing_"
            f"class); its columns are {columns}. Set {' and '.join(field_names)} to the column that holds the text"
            + (", or give `prompt` and `completion` texts." if causal_lm else ".")
        )

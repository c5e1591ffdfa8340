"""The one place a batch is split into what each model receives.

A batch may hold keys for the teacher only (`teacher_<key>`, e.g. `teacher_pixel_values` when the two models
preprocess images differently; the teacher gets them without the prefix, in place of the student's) and keys that
are hfkd's own bookkeeping (`hfkd_*`: cached teacher outputs, row ids), which no model receives. Labels go to the
student only.
"""

TEACHER_PREFIX = "teacher_"
INTERNAL_PREFIX = "hfkd_"
LABEL_KEYS = ("labels", "label", "label_ids")
# Which of several teachers teaches each row (hfkd.mixing, teacher_combine="teacher_id"): no model receives it.
TEACHER_ID = "teacher_id"
# A teacher with its own tokenizer (hfkd.two_tokenizers): each token's span id on each side.
# Column added to the training data so that each batch knows which rows it holds (cached outputs, per-row memory).
ROW_COLUMN = "hfkd_row"
SPANS = "hfkd_spans"
TEACHER_SPANS = "hfkd_teacher_spans"
# The inputs a transformers model is named by (`main_input_name`): text, audio (raw or features), images.
MAIN_INPUTS = ("input_ids", "input_values", "input_features", "pixel_values")


def student_inputs(batch: dict) -> dict:
    """The student's keyword arguments: everything but teacher-only and hfkd keys (labels included)."""
    return {k: v for k, v in batch.items() if not _is_teacher_key(k) and not _is_internal(k) and k != TEACHER_ID}


def teacher_inputs(batch: dict) -> dict:
    """The teacher's keyword arguments: the student's inputs without labels, `teacher_*` keys renamed over them.

    A batch with `teacher_input_ids` holds the teacher's own tokenization (hfkd.two_tokenizers), and one with a
    `teacher_` main input of a kind the student's side lacks (`teacher_input_values` beside `input_ids`, say) holds the
    teacher's own modality (hfkd.cross_modal): the teacher then gets its `teacher_*` keys alone, since none of the
    student's inputs fit it.
    """
    if TEACHER_PREFIX + "input_ids" in batch or any(
        TEACHER_PREFIX + key in batch and key not in batch for key in MAIN_INPUTS
    ):
        return {k[len(TEACHER_PREFIX) :]: v for k, v in batch.items() if _is_teacher_key(k) and k != TEACHER_ID}
    view = {k: v for k, v in student_inputs(batch).items() if k not in LABEL_KEYS and k != "num_items_in_batch"}
    view.update({k[len(TEACHER_PREFIX) :]: v for k, v in batch.items() if _is_teacher_key(k) and k != TEACHER_ID})
    return view


def teacher_key(key: str) -> str:
    """The batch key that holds `key` for the teacher only."""
    return TEACHER_PREFIX + key


def _is_teacher_key(key) -> bool:
    return isinstance(key, str) and key.startswith(TEACHER_PREFIX)


def _is_internal(key) -> bool:
    return isinstance(key, str) and key.startswith(INTERNAL_PREFIX)


# The probe (DistillationTrainer._probe) checks shapes, vocabularies and heads, none of which depends on the length:
# on long rows it reads the first PROBE_POSITIONS tokens, so that building a trainer for 4k-token rows and a 256k
# vocabulary does not hold both models' full logits for two whole rows (16 GiB at 4096 x 256,000 in float32).
PROBE_POSITIONS = 128
_TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "labels", "token_type_ids", "position_ids"})


def probe_window(batch: dict, positions: int = PROBE_POSITIONS) -> dict:
    """The batch cut to its first `positions` tokens where that is safe, else the batch itself.

    Cut only plain token batches: every tensor of two or more dimensions is one of the usual per-token inputs and
    as long as `input_ids` (not an encoder-decoder's labels), no teacher-only or hfkd key (a teacher cache's rows or
    spans are stored at full length), and every row keeps a token to attend to.
    """
    ids = batch.get("input_ids")
    if not hasattr(ids, "dim") or ids.dim() != 2 or ids.shape[1] <= positions:
        return batch
    if any(k != TEACHER_ID and (_is_teacher_key(k) or _is_internal(k)) for k in batch):
        return batch
    long = {k for k, v in batch.items() if hasattr(v, "dim") and v.dim() >= 2}
    if long - _TOKEN_KEYS or any(batch[k].shape[1] != ids.shape[1] for k in long):
        return batch
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, :positions].sum(dim=1) == 0).any()):
        return batch  # left padding longer than the window
    return {k: v[:, :positions] if k in long else v for k, v in batch.items()}

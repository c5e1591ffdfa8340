"""Tiny randomly initialised models and data sets for fast end-to-end distillation tests: the one place the test
modules take them from (test modules do not import each other).

Every factory seeds torch before building, so the same call always gives the same weights. Teachers are 32 wide
with 3-4 layers, students 16 wide with 2 layers, and both keep 2 attention heads so attention maps line up while the
hidden sizes differ (which makes hfkd build projections). Nothing here imports hfkd.

The last section holds the older, differently sized factories (`bert`, `llama`, `bert_with`, `vit_with`) and data
sets (`classification_data`, `lm_data`) that the trainer, cache, chunked, run and check tests are written against,
and the `COMMON` training arguments of those tests.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB_SIZE = 100
PAD_ID = 0
EOS_ID = 1
MASK_ID = 4
FIRST_WORD_ID = 5  # ids below are special tokens
NUM_LABELS = 3
NUM_HEADS = 2
SEQ_LEN = 10
TARGET_LEN = 6
IMAGE_SIZE = 16
CONV_IMAGE_SIZE = 32

TEACHER_WIDTH, TEACHER_LAYERS = 32, 4
STUDENT_WIDTH, STUDENT_LAYERS = 16, 2


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- text models
_BERT_HEADS = {
    "sequence": BertForSequenceClassification,
    "token": BertForTokenClassification,
    "mlm": BertForMaskedLM,
}


def tiny_bert(
    head: str = "sequence",
    hidden_size: int = 32,
    num_layers: int = 4,
    *,
    seed: int = 0,
    attn_implementation="eager",
    attention_dropout: float = 0.0,
):
    """BERT with a sequence-classification, token-classification or masked-LM head."""
    _seeded(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=32,
        attention_probs_dropout_prob=attention_dropout,  # eager maps are taken after dropout in training
        pad_token_id=PAD_ID,
        num_labels=NUM_LABELS,
        attn_implementation=attn_implementation,
    )
    return _BERT_HEADS[head](config)


def tiny_llama(hidden_size: int = 32, num_layers: int = 4, *, seed: int = 0, attn_implementation="eager"):
    _seeded(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        bos_token_id=2,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(hidden_size: int = 32, num_layers: int = 4, *, seed: int = 0, attn_implementation="eager"):
    _seeded(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=32,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=NUM_HEADS,
        attn_pdrop=0.0,
        pad_token_id=PAD_ID,
        bos_token_id=2,
        eos_token_id=EOS_ID,
        attn_implementation=attn_implementation,
    )
    return GPT2LMHeadModel(config)


def tiny_t5(
    hidden_size: int = 32,
    num_layers: int = 4,
    *,
    seed: int = 0,
    attn_implementation="eager",
    dropout_rate: float = 0.0,
):
    """T5; its single `dropout_rate` also drops attention probabilities, so it is 0 unless asked for."""
    _seeded(seed)
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=hidden_size,
        d_kv=hidden_size // NUM_HEADS,
        d_ff=2 * hidden_size,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=NUM_HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=dropout_rate,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        attn_implementation=attn_implementation,
    )
    return T5ForConditionalGeneration(config)


def tiny_bart(hidden_size: int = 32, num_layers: int = 4, *, seed: int = 0, attn_implementation="eager"):
    _seeded(seed)
    config = BartConfig(
        vocab_size=VOCAB_SIZE,
        d_model=hidden_size,
        encoder_layers=num_layers,
        decoder_layers=num_layers,
        encoder_attention_heads=NUM_HEADS,
        decoder_attention_heads=NUM_HEADS,
        encoder_ffn_dim=2 * hidden_size,
        decoder_ffn_dim=2 * hidden_size,
        max_position_embeddings=32,
        pad_token_id=PAD_ID,
        bos_token_id=2,
        eos_token_id=EOS_ID,
        decoder_start_token_id=EOS_ID,
        forced_eos_token_id=None,
        attn_implementation=attn_implementation,
    )
    return BartForConditionalGeneration(config)


# ---------------------------------------------------------------------------------------------------- vision models
def tiny_vit(hidden_size: int = 32, num_layers: int = 4, *, seed: int = 0, attn_implementation="eager"):
    """ViT on 16x16 images with 4x4 patches: 16 patches + [CLS] = 17 tokens."""
    _seeded(seed)
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        intermediate_size=2 * hidden_size,
        num_labels=NUM_LABELS,
        attn_implementation=attn_implementation,
    )
    return ViTForImageClassification(config)


def tiny_resnet(hidden_sizes=(16, 32, 64), *, seed: int = 0, channels: int = 3, labels: int = NUM_LABELS):
    """Basic-block ResNet, one block per stage. On 32x32 images its feature maps are 8, 8, 4, 2 pixels wide for
    three stages, so a two-stage student has both other channel counts and other spatial sizes than its teacher."""
    _seeded(seed)
    config = ResNetConfig(
        num_channels=channels,
        embedding_size=hidden_sizes[0],
        hidden_sizes=list(hidden_sizes),
        depths=[1] * len(hidden_sizes),
        layer_type="basic",
        num_labels=labels,
    )
    return ResNetForImageClassification(config)


def tiny_convnext(hidden_sizes=(16, 32, 64), *, seed: int = 0):
    """ConvNeXt with one block per stage; stride-4 stem then stride 2 per extra stage (8, 8, 4, 2 on 32x32)."""
    _seeded(seed)
    config = ConvNextConfig(
        num_channels=3,
        patch_size=4,
        num_stages=len(hidden_sizes),
        hidden_sizes=list(hidden_sizes),
        depths=[1] * len(hidden_sizes),
        num_labels=NUM_LABELS,
        image_size=CONV_IMAGE_SIZE,
        layer_scale_init_value=0.1,  # the default 1e-6 makes every block almost the identity
    )
    return ConvNextForImageClassification(config)


# ---------------------------------------------------------------------------------------------------- data sets
def _padded_token_ids(num_rows: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random word ids with right padding on every other row (0 to seq_len - 3 pad positions)."""
    input_ids = torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (num_rows, seq_len), generator=generator)
    attention_mask = torch.ones(num_rows, seq_len, dtype=torch.long)
    for row in range(1, num_rows, 2):
        num_pad = 1 + row % (seq_len - 3)
        attention_mask[row, seq_len - num_pad :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_ID)
    return input_ids, attention_mask


def text_dataset(task: str, num_rows: int = 8, seq_len: int = SEQ_LEN, *, seed: int = 0) -> Dataset:
    """Token ids with padding (attention_mask 0) on some rows and labels for `task`.

    - 'sequence': one class per row.
    - 'token': one class per token, -100 at padding.
    - 'mlm': ~25% of the real tokens replaced by MASK_ID; labels are the original ids there and -100 elsewhere.
    - 'causal': labels = input_ids with -100 at padding (the model shifts them).
    - 'causal_all_masked': every label -100, as in a batch of prompts whose completions were cut off.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids, attention_mask = _padded_token_ids(num_rows, seq_len, generator)
    real = attention_mask.bool()
    if task == "sequence":
        labels = torch.randint(0, NUM_LABELS, (num_rows,), generator=generator)
    elif task == "token":
        labels = torch.randint(0, NUM_LABELS, (num_rows, seq_len), generator=generator).masked_fill(~real, -100)
    elif task == "mlm":
        chosen = (torch.rand(num_rows, seq_len, generator=generator) < 0.25) & real
        chosen[:, 1] = True  # at least one masked token per row (position 1 is never padding)
        labels = input_ids.masked_fill(~chosen, -100)
        input_ids = input_ids.masked_fill(chosen, MASK_ID)
    elif task == "causal":
        labels = input_ids.masked_fill(~real, -100)
    elif task == "causal_all_masked":
        labels = torch.full_like(input_ids, -100)
    else:
        raise ValueError(f"unknown task {task!r}")
    return Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist()}
    )


def seq2seq_dataset(
    num_rows: int = 8, seq_len: int = SEQ_LEN, target_len: int = TARGET_LEN, *, seed: int = 0
) -> Dataset:
    """Padded source ids and targets ending in EOS, padded with -100 on every other row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids, attention_mask = _padded_token_ids(num_rows, seq_len, generator)
    labels = torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (num_rows, target_len), generator=generator)
    for row in range(num_rows):
        length = target_len if row % 2 == 0 else 2 + row % (target_len - 2)
        labels[row, length - 1] = EOS_ID
        labels[row, length:] = -100
    return Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist()}
    )


def image_dataset(num_rows: int = 8, image_size: int = IMAGE_SIZE, *, seed: int = 0) -> Dataset:
    """Random `pixel_values` [3, size, size] as float lists and one class per image."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(num_rows, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, NUM_LABELS, (num_rows,), generator=generator)
    return Dataset.from_dict({"pixel_values": pixel_values.tolist(), "labels": labels.tolist()})


# ---------------------------------------------------------------------------------------------------- pairs
def _pair(build, **kwargs):
    teacher = build(TEACHER_WIDTH, TEACHER_LAYERS, seed=0, **kwargs)
    student = build(STUDENT_WIDTH, STUDENT_LAYERS, seed=1, **kwargs)
    return teacher, student


def teacher_student_pair(family: str, attn_implementation: str = "eager"):
    """(teacher, student) for a family name; the student is narrower and shallower than the teacher."""
    attn = {"attn_implementation": attn_implementation}
    if family in ("bert_sequence", "bert_token", "bert_mlm"):
        head = family.split("_", 1)[1]
        return (
            tiny_bert(head, TEACHER_WIDTH, TEACHER_LAYERS, seed=0, **attn),
            tiny_bert(head, STUDENT_WIDTH, STUDENT_LAYERS, seed=1, **attn),
        )
    builders = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "bart": tiny_bart, "vit": tiny_vit}
    if family in builders:
        return _pair(builders[family], **attn)
    if family == "resnet":
        return tiny_resnet((16, 32, 64), seed=0), tiny_resnet((8, 16), seed=1)
    if family == "convnext":
        return tiny_convnext((16, 32, 64), seed=0), tiny_convnext((8, 16), seed=1)
    raise ValueError(f"unknown family {family!r}")


def dataset_for(family: str, num_rows: int = 8, *, seed: int = 0) -> Dataset:
    if family.startswith("bert_"):
        return text_dataset(family.split("_", 1)[1], num_rows, seed=seed)
    if family in ("llama", "gpt2"):
        return text_dataset("causal", num_rows, seed=seed)
    if family in ("t5", "bart"):
        return seq2seq_dataset(num_rows, seed=seed)
    if family == "vit":
        return image_dataset(num_rows, IMAGE_SIZE, seed=seed)
    if family in ("resnet", "convnext"):
        return image_dataset(num_rows, CONV_IMAGE_SIZE, seed=seed)
    raise ValueError(f"unknown family {family!r}")


# ---------------------------------------------------------------------------------------------------- shared helpers
# Training arguments of the trainer-level tests: CPU, no reporting, nothing saved unless a test asks for it.
COMMON = {"report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no", "seed": 0}


def projector_of(trainer):
    """The hidden term's learned projections (None when the widths match or there is no hidden term)."""
    term = trainer.term_set.terms["hidden"] if "hidden" in trainer.term_set.terms else None
    return term.projector if term is not None else None


def parameters_of(model) -> dict[str, torch.Tensor]:
    """A detached copy of every named parameter, to compare runs or check what changed."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bert(hidden=32, layers=4, heads=4, labels=3, vocab=99, dropout=0.1, seed=0):
    """BERT sequence classifier over 99 ids with 4 heads and dropout (unlike `tiny_bert`)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        num_labels=labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def llama(hidden=32, layers=2, vocab=64, seed=0):
    """Llama over 64 ids with 4 query and 2 key-value heads (unlike `tiny_llama`)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def bert_with(head="sequence", *, vocab=VOCAB_SIZE, heads=2, labels=NUM_LABELS, hidden=16, layers=2, seed=1, **kw):
    """A student-sized BERT (sequence classifier or masked LM) with any of its sizes changed."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        attention_probs_dropout_prob=0.0,
        num_labels=labels,
        **kw,
    )
    return (BertForMaskedLM if head == "mlm" else BertForSequenceClassification)(config)


def vit_with(image_size=16, num_channels=3, hidden=16, layers=2, seed=1):
    """A student-sized ViT with another image size or channel count."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=num_channels,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        num_labels=NUM_LABELS,
        attn_implementation="eager",
    )
    return ViTForImageClassification(config)


def classification_data(n=16, length=10, vocab=99, labels=3, seed=0):
    """Rows padded on the right by 0, 2, 4 or 6 positions, one class each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, length - (i % 4) * 2 :] = 0  # ragged padding
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "labels": torch.randint(0, labels, (n,), generator=g).tolist(),
        }
    )


def lm_data(n=8, length=12, vocab=64, seed=0):
    """Causal-LM rows padded on the right (labels -100 there) by 0, 9, 6, 3 positions and, in row 4, entirely (12):
    very uneven token counts, and one row whose every label is -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, length - 3 * i :] = 0 if i else 1  # slices from the end for 3 * i > length: see the docstring
    labels = ids.masked_fill(mask == 0, -100)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


# ---------------------------------------------------------------------------------------------------- cross-modal
AUDIO_RATE = 16_000  # Hz, the rate transformers' speech feature extractors expect
AUDIO_SECONDS = 1  # the tiny Whisper's fixed window (whole seconds: WhisperFeatureExtractor's chunk_length)
WORDS = "good bad fine great awful okay love hate the a movie film was is very not".split()


def word_tokenizer(folder):
    """A WordPiece tokenizer over WORDS (fast, with [PAD] = 0), saved in `folder` (a path)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))  # vocab_file= builds an empty vocabulary in transformers 5
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_whisper_classifier(hidden_size: int = 16, num_layers: int = 2, *, num_mel_bins: int = 16, seed: int = 1):
    """WhisperForAudioClassification (its encoder, a projection and a classifier) over a 1 s window of
    `num_mel_bins` log-mel bins: 100 frames, 50 positions after the encoder's stride-2 convolution."""
    from transformers import WhisperConfig, WhisperForAudioClassification

    _seeded(seed)
    config = WhisperConfig(
        d_model=hidden_size,
        encoder_layers=num_layers,
        encoder_attention_heads=NUM_HEADS,
        encoder_ffn_dim=2 * hidden_size,
        decoder_layers=1,
        decoder_attention_heads=NUM_HEADS,
        decoder_ffn_dim=2 * hidden_size,
        num_mel_bins=num_mel_bins,
        max_source_positions=int(AUDIO_SECONDS * 100) // 2,
        vocab_size=VOCAB_SIZE,
        pad_token_id=PAD_ID,  # the decoder's special ids (unused by the classifier) within its vocabulary
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=EOS_ID,
        classifier_proj_size=hidden_size,
        num_labels=NUM_LABELS,
    )
    return WhisperForAudioClassification(config)


def whisper_features(num_mel_bins: int = 16, sampling_rate: int = AUDIO_RATE):
    """The tiny Whisper's feature extractor: `num_mel_bins` log-mel bins, 10 ms hops, a 1 s window."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=num_mel_bins,
        sampling_rate=sampling_rate,
        hop_length=sampling_rate // 100,
        chunk_length=AUDIO_SECONDS,
    )


def spoken_rows(num_rows: int = 8, *, seed: int = 0, labelled=None) -> Dataset:
    """Rows of a text, an audio array made from it (a tone per word: the label's word sets the pitch, so audio and
    text carry the same class), and a label (-100 for rows not in `labelled`)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"text": [], "audio": [], "label": []}
    cue = ["awful", "okay", "great"]
    for i in range(num_rows):
        label = i % NUM_LABELS
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3,), generator=g)] + [cue[label]]
        seconds = 0.2 + 0.05 * (i % 5)  # unequal lengths, all within the window
        t = torch.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
        tone = torch.sin(2 * torch.pi * (220.0 * (label + 1)) * t) + 0.05 * torch.randn(t.shape, generator=g)
        rows["text"].append(" ".join(words))
        rows["audio"].append(tone.tolist())
        rows["label"].append(label if labelled is None or i in labelled else -100)
    return Dataset.from_dict(rows)


class PlainCNN(torch.nn.Module):
    """A timm-style classifier for 3-channel images: forward(x) returns a logits tensor (3 classes); no config, no
    hidden_states, and an input not named pixel_values (hfkd must pass the batch's main input by position)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.global_pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.global_pool(self.features(x)).flatten(1))

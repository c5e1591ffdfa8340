"""Builds the student of recipes/causal-lm/smollm2-own-tokenizer.yaml: a tokenizer of its own and a small Llama.

    python recipes/causal-lm/own_tokenizer_student.py --config recipes/causal-lm/smollm2-own-tokenizer.yaml \
        --output outputs/own-tokenizer-student

The tokenizer is a byte-level BPE (the `tokenizers` library) trained on the recipe's training split only: the
split comes from hfkd's own `load_splits` with the recipe's data fields and seed, so the held-out rows the recipe
evaluates on never reach the tokenizer. The model is a Llama built from a config with random weights (seeded), its
vocabulary the tokenizer's. Both are saved into one folder, which the recipe names as student_model_name_or_path.
No network: the text is the recipe's (the fortune files).
"""

import argparse
import dataclasses
import json
import os

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hfkd.data import DataArguments, load_splits

EOS, PAD = "<|endoftext|>", "<pad>"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's pre-tokenization, no BOS added) with an EOS and a pad token of its own."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=2048)


def build_model(tokenizer, hidden: int, layers: int, heads: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,  # Llama's 8/3 ratio, rounded to a multiple of 64
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def recipe_splits(path: str):
    """The recipe's training split, made exactly as `hfkd distill` makes it (same data fields, same seed)."""
    with open(path) as handle:
        values = yaml.safe_load(handle)
    fields = {f.name for f in dataclasses.fields(DataArguments) if f.init}
    data_args = DataArguments(**{k: v for k, v in values.items() if k in fields})
    train, held_out = load_splits(data_args, values.get("seed", 42))
    return train, held_out, data_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="The recipe whose training split trains the tokenizer.")
    parser.add_argument("--output", required=True, help="Folder for the student and its tokenizer.")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--hidden_size", type=int, default=384)
    parser.add_argument("--num_layers", type=int, default=6)
    parser.add_argument("--num_heads", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train, held_out, data_args = recipe_splits(args.config)
    texts = [t for t in train[data_args.text_column] if t]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    model = build_model(tokenizer, args.hidden_size, args.num_layers, args.num_heads, args.seed)
    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    record = {
        "tokenizer": f"byte-level BPE, {len(tokenizer)} tokens, trained on the {len(texts)} training rows of "
        f"{args.config} ({sum(len(t.encode()) for t in texts):,} bytes); none of its held-out rows",
        "model": f"LlamaForCausalLM from a config, random weights (seed {args.seed}): {args.num_layers} layers, hidden "
        f"{args.hidden_size}, {args.num_heads} heads, tied embeddings, {model.num_parameters():,} parameters",
    }
    with open(os.path.join(args.output, "student_origin.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    print("\n".join(f"{k}: {v}" for k, v in record.items()))


if __name__ == "__main__":
    main()

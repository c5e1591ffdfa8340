"""Language-model evaluation that compares models with different tokenizers: bits per byte.

Perplexity is per token, and a tokenizer with longer tokens has fewer, each harder to predict: two models with
different tokenizers cannot be ranked by it. Bits per byte divides the same negative log-likelihood by the UTF-8
bytes of the text the predicted tokens spell, which does not depend on how the text was cut:

    bits_per_byte = sum over predicted text tokens of -log2 p(token | prefix) / bytes of the text they cover

A token at position 0 has no prediction, so the covered text starts after it (or at the text's start when position 0
is a special token such as BOS); special tokens (no characters: EOS, padding) count in neither sum. Perplexity per
own token is reported beside it, over the same tokens. Each text's own sums are kept too (`text_bits`,
`text_bytes`), so two models read by the same tokenizer can be compared text by text (hfkd.compare.paired_blocks).
"""

import math

import torch


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    max_length: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Bits per byte and per-token perplexity of a causal LM on `texts`, each read alone (truncated to `max_length`
    tokens).

    Args:
        model: a causal LM (`logits` `[batch, positions, vocabulary]`).
        tokenizer: its fast tokenizer (character offsets say which text each token spells).
        texts: the held-out texts; empty ones are skipped.

    Returns:
        {"bits_per_byte", "perplexity", "tokens", "bytes", "text_bits", "text_bytes"}: the last two per non-empty
        text, in order (0 and 0 for a text with no predicted token).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "bits_per_byte needs a fast tokenizer (its character offsets say which bytes each token spells)."
        )
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("bits_per_byte: no non-empty text to evaluate.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    nll, tokens, nbytes = 0.0, 0, 0
    text_nll, text_bytes = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            encoded = [
                tokenizer(t, truncation=max_length is not None, max_length=max_length, return_offsets_mapping=True)
                for t in chunk
            ]
            width = max(len(e["input_ids"]) for e in encoded)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            counted = torch.zeros((len(chunk), width), dtype=torch.bool)
            chunk_bytes = [0] * len(chunk)
            for row, (text, e) in enumerate(zip(chunk, encoded, strict=True)):
                n = len(e["input_ids"])
                ids[row, :n] = torch.tensor(e["input_ids"])
                mask[row, :n] = 1
                spans = [tuple(o) for o in e["offset_mapping"]]
                text_tokens = [i for i, (a, b) in enumerate(spans) if a < b]
                predicted = [i for i in text_tokens if i > 0]
                if not predicted:
                    continue
                counted[row, predicted] = True
                # The covered text starts where the last unpredicted text token ends (position 0, if it spells text).
                begin = spans[0][1] if spans[0][0] < spans[0][1] else 0
                chunk_bytes[row] = len(text[begin : spans[predicted[-1]][1]].encode("utf-8"))
            nbytes += sum(chunk_bytes)
            text_bytes += chunk_bytes
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:].to(device)
            token_nll = -log_probs.gather(-1, target[..., None]).squeeze(-1)
            keep = counted[:, 1:].to(device)
            nll += float(token_nll[keep].sum())
            text_nll += torch.where(keep, token_nll.double(), 0.0).sum(-1).tolist()
            tokens += int(keep.sum())
    finally:
        model.train(was_training)
    if tokens == 0 or nbytes == 0:
        raise ValueError("bits_per_byte: no token was predicted (every text is one token or less).")
    return {
        "bits_per_byte": nll / math.log(2) / nbytes,
        "perplexity": math.exp(min(nll / tokens, 50.0)),
        "tokens": tokens,
        "bytes": nbytes,
        "text_bits": [v / math.log(2) for v in text_nll],
        "text_bytes": text_bytes,
    }

"""What storing the teacher's hidden states in half precision does to the hidden term, against float32.

A tiny random Llama teacher (hidden 256, 4 layers) and student (hidden 128, 2 layers, projected to 256) on one batch
of 8 x 64 tokens: the hidden term (cosine and MSE, student layers 1, 2 against teacher layers 2, 4) with the teacher's
states in float32 and rounded to bfloat16 or float16; prints the relative change of its value and of its gradient
with respect to the student's parameters and the projection.

Usage: python benchmarks/cache_hidden_dtype.py
"""

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM


def _llama(hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    torch.manual_seed(0)
    teacher, student = _llama(256, 4).eval(), _llama(128, 2)
    projection = torch.nn.Linear(128, 256, bias=False)
    params = list(student.parameters()) + [projection.weight]
    ids = torch.randint(0, 1000, (8, 64))
    with torch.no_grad():
        t_states = teacher(ids, output_hidden_states=True).hidden_states
    pairs = [(1, 2), (2, 4)]
    losses = {
        "cosine": lambda s, t: (1 - F.cosine_similarity(s, t, dim=-1)).mean(),
        "mse": F.mse_loss,
    }
    for name, loss_fn in losses.items():
        for dtype in (torch.bfloat16, torch.float16):
            values, grads = [], []
            for stored in (torch.float32, dtype):
                s_states = student(ids, output_hidden_states=True).hidden_states
                loss = sum(loss_fn(projection(s_states[i]), t_states[j].to(stored).float()) for i, j in pairs)
                grad = torch.autograd.grad(loss, params, allow_unused=True)
                values.append(loss.item())
                grads.append(torch.cat([g.reshape(-1) for g in grad if g is not None]).double())
            value = abs(values[1] - values[0]) / abs(values[0])
            gradient = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
            print(f"{name:6s} {str(dtype)[6:]:8s} value relative change {value:.1e}, gradient {gradient:.1e}")


if __name__ == "__main__":
    main()

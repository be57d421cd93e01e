"""Log-mel features, the audio input of the speech task (numpy only).

The shipped spoken-number set and the real-corpus loader go through the same `log_mel`, so a
model trained on one reads the other's features. Wave files decode with the standard library.
"""

from __future__ import annotations

import io
import wave

import numpy as np

N_MELS = 40
WIN_MS = 25.0
HOP_MS = 20.0
F_MAX = 8000.0


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int = N_MELS, f_max: float = F_MAX) -> np.ndarray:
    """Triangular HTK-mel filters `[n_mels, n_fft // 2 + 1]` between 0 Hz and min(f_max, sr/2)."""
    f_max = min(f_max, sample_rate / 2)
    edges_hz = _mel_to_hz(np.linspace(0.0, _hz_to_mel(f_max), n_mels + 2))
    bins_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, center, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bins_hz[None] - lower) / (center - lower)
    falling = (upper - bins_hz[None]) / (upper - center)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def log_mel(samples: np.ndarray, sample_rate: int, n_mels: int = N_MELS) -> np.ndarray:
    """Waveform `[N]` (float in [-1, 1] or int16) -> natural-log mel energies `[frames, n_mels]`."""
    x = np.asarray(samples)
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    x = x.astype(np.float32).reshape(-1)
    win = int(round(sample_rate * WIN_MS / 1000))
    hop = int(round(sample_rate * HOP_MS / 1000))
    n_fft = 1 << (win - 1).bit_length()
    if len(x) < win:
        x = np.pad(x, (0, win - len(x)))
    n_frames = 1 + (len(x) - win) // hop
    frames = np.lib.stride_tricks.as_strided(x, (n_frames, win), (x.strides[0] * hop, x.strides[0]))
    spectrum = np.fft.rfft(frames * np.hanning(win).astype(np.float32), n=n_fft)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return np.log(power @ mel_filterbank(sample_rate, n_fft, n_mels).T + 1e-6).astype(np.float32)


def normalize(features_TF: np.ndarray) -> np.ndarray:
    """Per-utterance mean and variance normalisation `[T, F] -> [T, F]` (float32)."""
    f = features_TF.astype(np.float32)
    return (f - f.mean()) / (f.std() + 1e-5)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM wave bytes -> (mono int16 samples `[N]`, sample rate)."""
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"expected 16-bit PCM wave data, got {8 * w.getsampwidth()}-bit")
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        return samples.reshape(-1, w.getnchannels())[:, 0].copy(), w.getframerate()

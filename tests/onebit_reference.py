"""An independent numpy transcription of DeepSpeed's 1-bit Adam and its golden problem.

Used to check settings the golden does not store (``W4_wd0.1``, other worker counts): the
rules below follow ``OnebitAdam.step`` and ``NcclBackend.compressed_allreduce`` line by line
with explicit loops over workers and ranks (no collectives, no vectorisation), and are
themselves checked against the stored ``W4_wd0`` run.
"""

from __future__ import annotations

import math

import numpy as np

KEYS = ("w1", "w2", "b")


def padded(numel: int, workers: int) -> int:
    unit = workers * (workers * 8 // math.gcd(workers, 8))
    return numel if numel % unit == 0 else numel + unit - numel % unit


def compressed_allreduce(ms, worker_err, server_err):
    """ms: per-worker flat float32 tensors; errors updated in place; returns the mean."""
    workers = len(ms)
    n, n_pad = ms[0].size, worker_err[0].size
    k = n_pad // workers
    signs, scales = [], []
    for w in range(workers):
        x = np.concatenate([ms[w], np.zeros(n_pad - n, np.float32)]) + worker_err[w]
        scale = np.float32(np.linalg.norm(x) / np.sqrt(n_pad))
        sign = np.where(x >= 0, 1.0, -1.0).astype(np.float32)
        worker_err[w] = (x - scale * sign).astype(np.float32)
        signs.append(sign)
        scales.append(scale)
    out = np.empty(n_pad, np.float32)
    for r in range(workers):
        y = np.zeros(k, np.float32)
        for w in range(workers):
            y = y + signs[w][r * k : (r + 1) * k] * np.float32(scales[w] * np.float32(1 / workers))
        y = y + server_err[r]
        scale = np.float32(np.linalg.norm(y) / np.sqrt(k))
        sign = np.where(y >= 0, 1.0, -1.0).astype(np.float32)
        server_err[r] = (y - scale * sign).astype(np.float32)
        out[r * k : (r + 1) * k] = scale * sign
    return out[:n]


class OnebitAdam:
    """Per-tensor state of every worker, stepped with each worker's local gradient."""

    def __init__(self, params, workers, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, freeze=4):
        self.p = {k: v.astype(np.float32).copy() for k, v in params.items()}
        self.w, self.lr, self.b1, self.b2, self.eps, self.wd = workers, lr, b1, b2, eps, wd
        self.freeze = freeze
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.we = {
            k: [np.zeros(padded(v.size, workers), np.float32)] * workers for k, v in self.p.items()
        }
        self.se = {
            k: [np.zeros(padded(v.size, workers) // workers, np.float32)] * workers
            for k, v in self.p.items()
        }
        self.step_count = 0
        self.frozen = False

    def step(self, local_grads):
        """local_grads: {key: (W, *shape)}; returns the params after the step."""
        self.step_count += 1
        if self.step_count == 1:  # initialization call: no update
            return self.p
        f32 = np.float32
        for k in self.p:
            p, m, v = self.p[k], self.m[k], self.v[k]
            if not self.frozen:
                g = np.mean(local_grads[k].astype(f32), axis=0).astype(f32)
                m = f32(self.b1) * m + f32(1 - self.b1) * g
                v = f32(self.b2) * v + f32(1 - self.b2) * g * g
            else:
                local = [
                    f32(self.b1) * m + f32(1 - self.b1) * local_grads[k][w] for w in range(self.w)
                ]
                if self.w > 1:
                    flat = compressed_allreduce(
                        [x.reshape(-1) for x in local], self.we[k], self.se[k]
                    )
                    m = flat.reshape(p.shape)
                else:
                    m = local[0]
            update = m / (np.sqrt(v) + f32(self.eps)) + f32(self.wd) * p
            self.p[k] = (p - f32(self.lr) * update).astype(f32)
            self.m[k], self.v[k] = m.astype(f32), v.astype(f32)
        if not self.frozen and self.step_count >= self.freeze:
            self.frozen = True
        return self.p


def draws(seed: int, scale: float, shapes) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    return {k: (scale * rs.randn(*shapes[k])).astype(np.float32) for k in KEYS}


def local_gradients(params, target, t: int, workers: int, shapes) -> dict[str, np.ndarray]:
    """The golden's local gradients at step t (1-based): ``(p - T) + noise_t + e_{t,w}``."""
    noise = draws(100 + t, 0.05, shapes)
    out = {k: np.empty((workers, *shapes[k]), np.float32) for k in KEYS}
    for w in range(workers):
        e = draws(1000 + 10 * t + w, 0.05, shapes)
        for k in KEYS:
            out[k][w] = (params[k] - target[k]) + noise[k] + e[k]
    return out

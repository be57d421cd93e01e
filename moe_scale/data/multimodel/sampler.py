"""Joint training over several tasks: every batch comes from one task, drawn by weight."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from moe_scale.data.multimodel.tasks import Batch, Task, collate


class JointSampler:
    """Endless stream of single-task `Batch`es; task i is drawn with probability w_i / sum(w).

    weights: one per task, a {name: weight} mapping (missing names weigh 0), or None (uniform).
    Each task's training examples are visited in a fresh seeded permutation per epoch.
    """

    def __init__(self, tasks: Sequence[Task], batch_size: int, weights=None, seed: int = 0):
        if not tasks:
            raise ValueError("JointSampler needs at least one task")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(weights, Mapping):
            unknown = set(weights) - {t.name for t in tasks}
            if unknown:
                raise ValueError(f"weights name unknown task(s) {sorted(unknown)}")
            weights = [weights.get(t.name, 0.0) for t in tasks]
        w = np.ones(len(tasks)) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (len(tasks),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(tasks)} non-negative numbers with a positive sum, got {weights}")
        self.tasks, self.batch_size, self.probs = list(tasks), batch_size, w / w.sum()
        self.rng = np.random.default_rng(seed)
        self._order = [self.rng.permutation(len(t.train)) for t in self.tasks]
        self._cursor = [0] * len(self.tasks)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        i = int(self.rng.choice(len(self.tasks), p=self.probs))
        return self.batch_from(i)

    def batch_from(self, i: int) -> Batch:
        """The next batch of task i (by position in `tasks`)."""
        task, picked = self.tasks[i], []
        while len(picked) < self.batch_size:
            if self._cursor[i] == len(self._order[i]):
                self._order[i], self._cursor[i] = self.rng.permutation(len(task.train)), 0
            take = self._order[i][self._cursor[i] : self._cursor[i] + self.batch_size - len(picked)]
            self._cursor[i] += len(take)
            picked += [task.train[j] for j in take]
        return collate(task.spec, picked)

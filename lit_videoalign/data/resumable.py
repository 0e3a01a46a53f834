"""``ResumableDataLoader``: a ``DataLoader`` whose place in the epoch is saved in checkpoints, so a resumed run goes on
with the next batch (in the same shuffled order) instead of starting the epoch again.

Lightning stores the ``state_dict`` of a training loader that has one in every checkpoint and hands it back to
``load_state_dict`` on resume, before the loader is iterated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from typing_extensions import override


class ResumableBatchSampler(BatchSampler):
    """A ``BatchSampler`` that can start its next epoch at a given batch and shuffling-generator state.

    Args:
        sampler: the index sampler; a ``RandomSampler`` with a ``generator`` keeps its shuffled order on resume.
        batch_size: indices per batch.
        drop_last: drop the last incomplete batch.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.epoch_state: torch.Tensor | None = None  # the generator's state when this epoch's order was drawn
        self._resume: tuple[torch.Tensor | None, int] | None = None

    @property
    def generator(self) -> torch.Generator | None:
        generator = getattr(self.sampler, "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    def resume_at(self, generator_state: torch.Tensor | None, batches: int) -> None:
        """Make the next epoch draw its order from ``generator_state`` and skip its first ``batches`` batches."""
        self._resume = (generator_state, int(batches))

    @override
    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            if state is not None and self.generator is not None:
                self.generator.set_state(state)
        self.epoch_state = self.generator.get_state() if self.generator is not None else None
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:  # skipped batches cost index draws only, no data loading
                yield batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` (same arguments) whose position within the epoch is checkpointed.

    ``state_dict()`` holds the shuffling generator's state at the start of the current epoch and the batches served
    since; after ``load_state_dict`` the next ``iter()`` draws the same order and serves the batches that were not
    served yet. At the end of an epoch it holds the state the next epoch starts from. Shuffling always uses a seeded
    generator (one drawn from the global RNG when none is given), so the order can be restored.

    Resuming is exact with the default single-process loading; with ``num_workers > 0`` the order and position are
    restored but a dataset that draws random numbers inside its workers draws other ones.
    """

    def __init__(self, dataset, batch_size: int | None = 1, shuffle: bool | None = None, sampler=None,
                 batch_sampler=None, drop_last: bool = False, generator: torch.Generator | None = None,
                 **kwargs: Any) -> None:
        if batch_sampler is None:
            if batch_size is None:
                raise ValueError("ResumableDataLoader needs batch_size (batches are what it counts)")
            if sampler is not None and shuffle:
                raise ValueError("sampler and shuffle=True are mutually exclusive")
            if sampler is None:
                if shuffle:
                    if generator is None:
                        generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_()))
                    sampler = RandomSampler(dataset, generator=generator)
                else:
                    sampler = SequentialSampler(dataset)
            batch_sampler = ResumableBatchSampler(sampler, batch_size, drop_last)
        elif type(batch_sampler) is BatchSampler:  # e.g. rebuilt by Lightning around a DistributedSampler
            batch_sampler = ResumableBatchSampler(batch_sampler.sampler, batch_sampler.batch_size,
                                                  batch_sampler.drop_last)
        elif not isinstance(batch_sampler, ResumableBatchSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableBatchSampler or a plain BatchSampler, got "
                            f"{type(batch_sampler).__name__}")
        super().__init__(dataset, batch_sampler=batch_sampler, generator=generator, **kwargs)
        self._served = 0  # batches served in the current epoch
        self._started = False  # iterated at least once

    @override
    def __iter__(self):
        pending = self.batch_sampler._resume
        self._served = pending[1] if pending is not None else 0
        self._started = True
        self.batch_sampler.epoch_state = None  # set again when this epoch's order is drawn
        return self._count(super().__iter__())

    def _count(self, batches) -> Iterator:
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": state the epoch's order is drawn from, "batches": batches of it already served}``."""
        sampler: ResumableBatchSampler = self.batch_sampler
        generator = sampler.generator
        if sampler._resume is not None:  # loaded, and this epoch's order not drawn yet
            return {"generator": sampler._resume[0], "batches": sampler._resume[1]}
        finished = self._served >= len(self)
        if generator is None:  # unshuffled (or a sampler with its own seeding): the position is all there is
            return {"generator": None, "batches": 0 if finished else self._served}
        if self._started and not finished:
            if sampler.epoch_state is not None:
                return {"generator": sampler.epoch_state, "batches": self._served}
            return {"generator": generator.get_state(), "batches": 0}  # iterator made, order not drawn yet
        # Before the first epoch or after the last batch of one: the state the next epoch's order is drawn from.
        # A new iterator first draws its workers' base seed from the same generator; a persistent one does not.
        ahead = torch.Generator()
        ahead.set_state(generator.get_state())
        if not (self.persistent_workers and self.num_workers > 0 and getattr(self, "_iterator", None) is not None):
            torch.empty((), dtype=torch.int64).random_(generator=ahead)
        return {"generator": ahead.get_state(), "batches": 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next ``iter()`` serves the batches of that epoch not yet served."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"generator", "batches"}:
            found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a ResumableDataLoader state: expected keys ['batches', 'generator'], got {found}")
        self.batch_sampler.resume_at(state_dict["generator"], state_dict["batches"])

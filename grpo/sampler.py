"""The training sampler: TRL's RepeatSampler layout, with the queries in the ordering schedule's order."""

from __future__ import annotations

from torch.utils.data import Sampler

from .ordering import OrderingSchedule


class OrderedRepeatSampler(Sampler):
    """Yields what `trl.trainer.utils.RepeatSampler` yields, minus the shuffle: for each chunk (one generation
    batch of queries) the chunk `repeat_count` times (steps_per_generation x num_iterations), each query
    `mini_repeat_count` times in a row (num_generations). Every process iterates the same sequence; accelerate
    hands each its slice of every generation batch, exactly as with TRL's sampler."""

    def __init__(self, schedule: OrderingSchedule, mini_repeat_count: int, repeat_count: int):
        self.schedule = schedule
        self.mini_repeat_count = mini_repeat_count
        self.repeat_count = repeat_count

    def __iter__(self):
        for chunk in self.schedule.chunks():
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index

    def __len__(self) -> int:
        s = self.schedule
        s.initial_round()  # with `drop` the pass is shorter; its length is known only after the first round
        return s.num_chunks * s.queries_per_chunk * self.mini_repeat_count * self.repeat_count

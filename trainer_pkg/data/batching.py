"""Batches: length-grouped training batches, sorted evaluation batches, one gather-and-pad per batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler

from trainer_pkg.config import TrainConfig


def length_grouped_batches(lengths: list[int], seed: int, epoch: int, chunk_rows: int,
                           cut: Callable[[list[int]], list[list[int]]], short_tail_last: bool = False) -> list[list[int]]:
    """Random order, but batches of similar length: shuffle all indices, sort each chunk of
    `chunk_rows` longest first, `cut` it into batches, shuffle the batches. A function of
    (seed, epoch) alone, so `skip_first_batches` resumes exactly."""
    # Mixed so that (seed, epoch + 1) never replays (seed + 1, epoch).
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk_rows):
        batches += cut(sorted(order[start:start + chunk_rows], key=lengths.__getitem__, reverse=True))
    tail = [batches.pop()] if short_tail_last and batches and len(batches[-1]) < len(batches[0]) else []
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + tail


class LengthGroupedSampler(Sampler[int]):
    """Row indices in length_grouped_batches order, in batches of `batch_size` rows.

    Only the last batch may be short, and it stays last so a DataLoader with the same batch_size
    cuts exactly these batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        size = self.batch_size
        for batch in length_grouped_batches(self.lengths, self.seed, self.epoch, size * self.group,
                                            lambda chunk: [chunk[i:i + size] for i in range(0, len(chunk), size)],
                                            short_tail_last=True):
            yield from batch


class PackedTokens(torch.utils.data.Dataset):
    """The tokenized rows as flat numpy arrays; a batch is one gather-and-pad, not B Arrow reads.

    Fetching rows one by one from an Arrow-backed `datasets.Dataset` and padding them with
    DataCollatorWithPadding is slow enough to cap a GPU run (docs/performance.md). The sampler
    still yields row indices (so samplers, sharding and skip_first_batches work unchanged);
    `collate` builds the padded tensors in one pass.
    """

    def __init__(self, dataset: Dataset, pad_token_id: int, with_row: bool = False, pad_to_multiple_of: int = 8):
        table = dataset.with_format("arrow")[:]  # rows in order, after any select/split
        ids = table.column("input_ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        self.token_ids = ids.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int64)
        self.starts = offsets[:-1] - offsets[0]
        self.lengths = np.diff(offsets)
        self.labels = table.column("labels").to_numpy() if "labels" in table.column_names else None
        self.pad_token_id = pad_token_id
        self.with_row = with_row
        self.multiple = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[rows]
        width = int(-(-lengths.max() // self.multiple) * self.multiple)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        for position, (start, length) in enumerate(zip(self.starts[rows], lengths)):
            input_ids[position, :length] = self.token_ids[start:start + length]
        batch = {"input_ids": torch.from_numpy(input_ids),
                 "attention_mask": torch.from_numpy((np.arange(width) < lengths[:, None]).astype(np.int64))}
        if self.labels is not None:
            batch["labels"] = torch.from_numpy(self.labels[rows].astype(np.int64))
        if self.with_row:
            batch["row"] = torch.from_numpy(rows)
        return batch


def pad_multiple() -> int:
    """Multiples of 8 keep tensor-core shapes on a GPU (and bound the number of distinct shapes); on the
    CPU every padded position is wasted arithmetic: benchmarks/padding.py measured both (docs/performance.md)."""
    return 8 if torch.cuda.is_available() else 1


def train_dataloader(dataset: Dataset, tokenizer, config: TrainConfig) -> DataLoader:
    packed = PackedTokens(dataset, tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple())
    lengths = packed.lengths.tolist()
    # A private generator: creating an iterator draws a seed from it, and drawing from the global
    # RNG instead would shift every later dropout mask after a resume.
    loading = dict(collate_fn=packed.collate, num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
                   generator=torch.Generator().manual_seed(config.seed))
    if config.group_by_length:
        sampler = LengthGroupedSampler(lengths, config.per_device_batch_size, config.seed)
    else:
        sampler = torch.utils.data.RandomSampler(packed, generator=torch.Generator().manual_seed(config.seed))
    return DataLoader(packed, batch_size=config.per_device_batch_size, sampler=sampler, **loading)


def eval_dataloader(dataset: Dataset, tokenizer, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches sorted by length, shortest first: least padding, and exact sharding.

    Under several processes Accelerate completes the last round with rows from the first
    batches. Shortest first, those rows never lengthen the padded batch they join, so every row
    is computed in the same padded shape, and gets the same logits, on any number of processes.
    Each batch carries `row`, the example's position in `dataset`, so gathered predictions can
    be put back in input order.
    """
    packed = PackedTokens(dataset, tokenizer.pad_token_id, with_row=True, pad_to_multiple_of=pad_multiple())
    order = np.argsort(packed.lengths, kind="stable").tolist()
    return DataLoader(
        packed, batch_size=batch_size, sampler=order, collate_fn=packed.collate,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
    )

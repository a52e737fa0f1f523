"""A tiny causal-LM dataset whose rows hide different numbers of label tokens (so per-row token counts differ,
which is what makes the normalisation of a loss under gradient accumulation observable)."""

import torch


class RaggedLabelRows(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int = 12, vocab: int = 97, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.rows = []
        for index in range(count):
            ids = torch.randint(3, vocab, (length,), generator=generator)
            labels = ids.clone()
            labels[: (index * 3) % (length - 2)] = -100
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows as one batch: (input_ids [count, length], labels [count, length])."""
        return (torch.stack([r["input_ids"] for r in self.rows]), torch.stack([r["labels"] for r in self.rows]))

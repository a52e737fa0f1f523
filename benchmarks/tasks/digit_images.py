"""scikit-learn's 8×8 handwritten digits as 1×8×8 images in [−1, 1] with a stratified held-out split, and a small CNN
digit classifier whose penultimate features score generated digits (an FID-like distance)."""

import numpy as np
import torch


def digit_split(held_out: int, seed: int) -> dict:
    """``load_digits`` (1797 images, pixels 0…16 scaled to [−1, 1]) split by ``train_test_split(test_size=held_out,
    stratify=labels, random_state=seed)``; each side sorted by its index in the data set.

    Returns ``images`` (the count), ``train`` / ``held`` ([n, 1, 8, 8]) and ``train_labels`` / ``held_labels``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    labels = torch.tensor(digits.target)
    train_index, held_index = train_test_split(np.arange(len(images)), test_size=held_out,
                                               stratify=digits.target, random_state=seed)
    train_index, held_index = torch.from_numpy(np.sort(train_index)), torch.from_numpy(np.sort(held_index))
    return {"images": len(images), "train": images[train_index], "held": images[held_index],
            "train_labels": labels[train_index], "held_labels": labels[held_index]}


class DigitClassifier(torch.nn.Module):
    """conv → conv → 2×2 max-pool → linear (the features) → ReLU → linear (10 classes), for 1×8×8 images."""

    def __init__(self, width: int = 32, features: int = 64):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(2 * width * 16, features))
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(features, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, config: dict, seed: int) -> DigitClassifier:
    """Adam on cross-entropy, ``config``: width, features, epochs, batch_size, learning_rate; returned in eval mode."""
    torch.manual_seed(seed)
    classifier = DigitClassifier(config["width"], config["features"])
    optimizer = torch.optim.Adam(classifier.parameters(), lr=config["learning_rate"])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config["epochs"]):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config["batch_size"]):
            index = order[start : start + config["batch_size"]]
            loss = torch.nn.functional.cross_entropy(classifier(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier.eval()

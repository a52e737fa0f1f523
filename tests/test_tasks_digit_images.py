"""The 8×8 digit images and the feature classifier of reflow_quality (benchmarks/tasks/digit_images.py)."""

import pytest
import torch

from benchmarks.tasks.digit_images import DigitClassifier, digit_split


def test_digit_split_is_stratified_disjoint_and_scaled_to_minus_one_one():
    pytest.importorskip("sklearn")
    split = digit_split(held_out=100, seed=0)
    train, held = split["train"], split["held"]
    assert len(train) + len(held) == split["images"] and len(held) == 100
    assert train.shape[1:] == held.shape[1:] == (1, 8, 8)
    assert train.min() == -1 and train.max() == 1 and held.min() >= -1 and held.max() <= 1
    # no held-out image is a training image (the digits data set has no duplicates)
    assert not (torch.cdist(held.flatten(1), train.flatten(1)) == 0).any()
    # stratified: every class is held out in proportion, 10 ± 1 images each
    counts = torch.bincount(split["held_labels"], minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    again = digit_split(held_out=100, seed=0)
    assert torch.equal(again["held"], held)


def test_classifier_features_are_its_penultimate_layer():
    classifier = DigitClassifier(width=4, features=16).eval()
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    features = classifier.features(images)
    assert features.shape == (3, 16) and classifier(images).shape == (3, 10)
    torch.testing.assert_close(classifier(images), classifier.head(features))

"""Paired bootstrap intervals (qsamc/task/intervals.py) and the per-image confusions they are built from."""

from __future__ import annotations

import pytest
import torch

from qsamc.task.intervals import Interval, mean_interval, miou_of, paired_bootstrap
from qsamc.task.metric import SegmentationMetric

CLASSES, IGNORE = 4, 255


def labels(seed: int, images: int = 6, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction labels, targets with some ignored pixels) [images, size, size], seeded."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, CLASSES, (images, size, size), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.1] = IGNORE
    prediction = torch.where(torch.rand(target.shape, generator=generator) < 0.6, target.clamp(max=CLASSES - 1),
                             torch.randint(0, CLASSES, target.shape, generator=generator))
    return prediction, target


def confusions(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    metric = SegmentationMetric(CLASSES, IGNORE, per_image=True)
    for start in range(0, len(target), 4):  # batches of 4 and a last batch of 2
        metric.update(prediction[start:start + 4], target[start:start + 4])
    return metric.images()


def test_per_image_confusions_are_each_images_own_and_sum_to_the_whole():
    prediction, target = labels(0)
    stack = confusions(prediction, target)
    assert stack.shape == (6, CLASSES, CLASSES)
    whole = SegmentationMetric(CLASSES, IGNORE)
    whole.update(prediction, target)
    assert torch.equal(stack.sum(0), whole.confusion)
    for i in range(6):
        alone = SegmentationMetric(CLASSES, IGNORE)
        alone.update(prediction[i:i + 1], target[i:i + 1])
        assert torch.equal(stack[i], alone.confusion)
    assert stack.sum() == int((target != IGNORE).sum())


def test_miou_of_a_confusion_is_the_metrics_miou_with_absent_classes_left_out():
    prediction, target = labels(1)
    target[target == 2], prediction[prediction == 2] = 0, 0  # class 2 absent from both
    metric = SegmentationMetric(CLASSES, IGNORE)
    metric.update(prediction, target)
    assert float(miou_of(metric.confusion)) == pytest.approx(metric.miou(), abs=1e-15)
    assert miou_of(torch.zeros(CLASSES, CLASSES)).isnan()


def test_identical_models_differ_by_exactly_nothing():
    stack = confusions(*labels(2))
    assert paired_bootstrap(stack, stack, samples=200) == Interval(0.0, 0.0, 0.0, 200)


def test_the_interval_is_the_percentiles_of_resampled_differences():
    prediction, target = labels(3, images=9)
    a = confusions(prediction, target)
    b = confusions(torch.where(prediction == 1, 0, prediction), target)  # b never predicts class 1
    interval = paired_bootstrap(a, b, samples=300, seed=5)
    # The same resamples, one by one: image indices drawn as paired_bootstrap draws them.
    draws = torch.randint(0, 9, (300, 9), generator=torch.Generator().manual_seed(5))
    differences = torch.stack([miou_of(a[d].sum(0)) - miou_of(b[d].sum(0)) for d in draws])
    low, high = torch.quantile(differences, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert interval.low == pytest.approx(low, abs=1e-12) and interval.high == pytest.approx(high, abs=1e-12)
    assert interval.difference == pytest.approx(float(miou_of(a.sum(0)) - miou_of(b.sum(0))), abs=1e-15)
    assert interval.low <= interval.difference <= interval.high
    assert interval.difference > 0 and not interval.tie  # losing a class on every image is not noise


def test_one_image_better_of_many_is_a_tie():
    prediction, target = labels(4, images=30)
    a = confusions(prediction, target)
    better = prediction.clone()
    better[0] = target[0].clamp(max=CLASSES - 1)  # b is right on every pixel of image 0 only
    interval = paired_bootstrap(a, confusions(better, target), samples=500)
    assert interval.difference < 0 and interval.tie
    assert interval.describe().startswith(f"{100 * interval.difference:+.2f} [")


def test_unpaired_stacks_are_refused():
    stack = confusions(*labels(5))
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(stack, stack[:-1])
    with pytest.raises(ValueError, match="at least one image"):
        paired_bootstrap(stack[:0], stack[:0])


def test_evaluate_keeps_each_images_confusion_when_asked():
    from qsamc.task.data import SyntheticConfig, build_dataset
    from qsamc.task.evaluate import ValidationSet, evaluate

    data = ValidationSet(build_dataset("synthetic", None, "val", synthetic=SyntheticConfig(count=5)), batch_size=2)
    weights = torch.randn(data.num_classes, 3, generator=torch.Generator().manual_seed(0))

    def forward(images):  # a per-pixel linear classifier: some pixels right, some wrong
        return torch.einsum("kc,bchw->bkhw", weights, images)

    whole = evaluate(forward, data, 64)
    kept = evaluate(forward, data, 64, per_image=True)
    assert whole.image_confusions is None and kept.image_confusions.shape == (5, data.num_classes, data.num_classes)
    assert float(miou_of(kept.image_confusions.sum(0))) == pytest.approx(whole.miou, abs=1e-12)
    assert (kept.loss, kept.miou) == (whole.loss, whole.miou)


def test_the_mean_over_folds_draws_each_folds_images_from_that_fold_alone():
    a, b = confusions(*labels(1)), confusions(*labels(2))
    c, d = confusions(*labels(3, images=9)), confusions(*labels(4, images=9))
    single = paired_bootstrap(a, b, samples=500, seed=5)
    both = mean_interval([(a, b), (c, d)], samples=500, seed=5)
    assert both.difference == pytest.approx((single.difference + paired_bootstrap(c, d).difference) / 2, abs=1e-12)
    # A second fold whose models agree on every image adds 0 to every resample: the mean is half of the first
    # fold's own resamples, which are drawn first from the same seed.
    halved = mean_interval([(a, b), (c, c)], samples=500, seed=5)
    assert (halved.low, halved.high) == pytest.approx((single.low / 2, single.high / 2), abs=1e-12)
    assert halved.difference == pytest.approx(single.difference / 2, abs=1e-12)
    with pytest.raises(ValueError, match="at least one pair"):
        mean_interval([])

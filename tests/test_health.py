"""Collapse detection on curves as trials write them (raymeta.train.health)."""

from raymeta.train.health import collapse

# MW-Net on digits, 40% uniform noise, seed 2 (sweeps/baselines-digits.yaml): the weighting
# net drove every weight to 0 in epoch 4; from epoch 5 the model predicts classes 1 and 2 only
LEARNED = [0.98148, 0.98182, 0.81132, 0.85455, 0.96296, 0.94545, 0.90741, 0.96296, 0.82692, 0.72222]
TWO_CLASSES = [0.0, 1.0, 0.90566, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def epoch(test_acc, class_acc, train_loss=0.5):
    return {"test_acc": test_acc, "test_class_acc": class_acc, "train_loss": train_loss}


def test_a_model_that_ends_predicting_two_classes_collapsed():
    curves = [epoch(0.896, LEARNED), epoch(0.241, [0.02, 0.98, 0.79, 0.56, 0.04, 0, 0, 0, 0, 0]),
              *[epoch(0.1907, TWO_CLASSES, 1e-7)] * 5]
    start, why = collapse(curves, 10)
    assert start == 1  # five of ten classes already dead at the second epoch
    assert why.startswith("the model predicts only a few classes: it gets no test sample of 8 "
                          "of the 10 classes right from epoch 1 to the end")


def test_a_noisy_model_that_misses_one_class_did_not_collapse():
    one_missed = [0.0, 0.9, 0.8, 0.7, 0.9, 0.6, 0.9, 0.8, 0.5, 0.7]
    assert collapse([epoch(0.9, LEARNED), epoch(0.66, one_missed), epoch(0.66, one_missed)], 10) is None


def test_dead_classes_count_only_after_the_model_learned_them():
    """A model that never got half the classes (no earlier epoch without them) is not a
    collapse by this rule; the ln K rule covers a model that learned nothing at all."""
    assert collapse([epoch(0.19, TWO_CLASSES), epoch(0.19, TWO_CLASSES)], 10) is None


def test_a_weighting_net_that_zeroes_every_weight_from_the_start_collapsed():
    """MW-Net (PGC form) on MNIST with SGD lr 0.1 and momentum 0.9
    (sweeps/mnist-mwnet-optimizer.yaml, uniform 40%, seed 0): every weight 0 from epoch 1, so
    the weighted training loss is exactly 0 and the model never leaves chance (19.4% after
    the first epoch, 11.4% at the end). No other rule sees it: the loss is not ln K, no epoch
    learned, and the classes it misses were never learned."""
    curves = [epoch(0.194, TWO_CLASSES, 0.175), *[epoch(0.1142, TWO_CLASSES, 0.0)] * 13]
    start, why = collapse(curves, 10)
    assert start == 1 and why.startswith("training loss 0 from epoch 1 to the end and test "
                                         "accuracy at chance (0.1142, K = 10)")
    learned = [epoch(0.97, LEARNED, 0.0)] * 3  # a model that fits its weighted loss to 0
    assert collapse(learned, 10) is None

"""The evaluation suite run at the end of training (and every `eval_every_steps`), and by
`python -m pmsn_jax.evaluate` on an export (docs/evaluation.md).

Frozen target-encoder CLS features on:
  * the balanced train split (60k for Fashion-MNIST): the k-NN bank, the linear-probe train set
    and the pool the low-shot images are drawn from;
  * the long-tailed pretraining subset: a second k-NN bank, more sensitive to tail classes;
  * the balanced test split: what every number is measured on.
For the k-NN and linear-probe predictions: top-1, per-class accuracy, balanced accuracy and the
many/medium/few-shot groups (by pretraining class counts). The same k-NN for a randomly
initialised encoder of the same config is reported alongside, because random ViT/CNN features
are already far above chance on small images.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from pmsn_jax.evals import classwise, features, knn, linear, lowshot


@dataclasses.dataclass(frozen=True)
class EvalData:
  train_images: np.ndarray     # balanced train split, uint8 [N,H,W,C]
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  pretrain_indices: np.ndarray  # rows of the train split used for pretraining
  num_classes: int

  def capped(self, max_train: int = 0, max_test: int = 0) -> "EvalData":
    """The first max_train / max_test rows (0 = all); pretraining rows among them stay."""
    n_train = min(max_train or len(self.train_labels), len(self.train_labels))
    n_test = min(max_test or len(self.test_labels), len(self.test_labels))
    return dataclasses.replace(
        self, train_images=self.train_images[:n_train], train_labels=self.train_labels[:n_train],
        test_images=self.test_images[:n_test], test_labels=self.test_labels[:n_test],
        pretrain_indices=self.pretrain_indices[self.pretrain_indices < n_train])

  @property
  def pretrain_counts(self) -> list[int]:
    labels = self.train_labels[self.pretrain_indices]
    return np.bincount(labels, minlength=self.num_classes).tolist()


def _knn(bank, bank_labels, queries, data: EvalData, cfg) -> np.ndarray:
  return knn.knn_classify(bank, bank_labels, queries, num_classes=data.num_classes,
                          k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)


def _classwise(pred, data: EvalData, cfg) -> tuple[list, dict, float]:
  """(per-class accuracy, many/medium/few-shot group means, balanced accuracy) of `pred`."""
  per_class = classwise.per_class_accuracy(pred, data.test_labels, data.num_classes)
  many, few = cfg.eval.shot_thresholds
  return (per_class, classwise.shot_groups(per_class, data.pretrain_counts, many, few),
          classwise.balanced_accuracy(pred, data.test_labels, data.num_classes))


def check(data: EvalData, config, *, linear_probe: bool = True) -> None:
  """Raises ValueError if `config.eval` cannot run on `data` (a class with fewer train images
  than the largest low-shot k). Cheap: call it before training, so the final evaluation does
  not fail after the run."""
  shots = tuple(config.eval.lowshot_shots)
  if linear_probe and shots:
    lowshot.check_shots(data.train_labels, data.num_classes, max(shots))


def evaluate(encode: Callable, random_encode: Callable | None, data: EvalData, config, mesh,
             *, linear_probe: bool = True) -> dict:
  """Returns the eval.json dict (without "step").

  encode / random_encode: jitted, eval_preprocess'ed (normalised) images [b,S,S,C] -> [b,D];
  random_encode may be None (no random-init reference). linear_probe=False (the mid-training
  evals) runs the k-NN only: no linear probe, no low-shot.
  """
  check(data, config, linear_probe=linear_probe)  # Seconds, not after feature extraction.
  shots = tuple(config.eval.lowshot_shots) if linear_probe else ()

  def feats(fn, images):
    return features.extract_features(fn, images, config.data,
                                     batch_size=config.eval.batch_size, mesh=mesh)

  train_f, test_f = feats(encode, data.train_images), feats(encode, data.test_images)
  lt_f, lt_labels = train_f[data.pretrain_indices], data.train_labels[data.pretrain_indices]
  knn_pred = _knn(train_f, data.train_labels, test_f, data, config)
  per_class, groups, balanced = _classwise(knn_pred, data, config)
  result = {
      "knn_top1": classwise.top1(knn_pred, data.test_labels),
      "knn_lt_top1": classwise.top1(_knn(lt_f, lt_labels, test_f, data, config),
                                    data.test_labels),
      "knn_balanced_top1": balanced,
      # The k-NN's per-class accuracies and groups keep their first, unprefixed names.
      "per_class_top1": per_class,
      "per_class_classifier": "knn",
      "groups": groups,
      "pretrain_class_counts": data.pretrain_counts,
      "shot_thresholds": list(config.eval.shot_thresholds),
      "features": config.eval.features,  # the encoder's readout (vit.FEATURE_READOUTS)
  }
  if linear_probe:
    pred = linear.linear_probe(train_f, data.train_labels, test_f, num_classes=data.num_classes,
                               epochs=config.eval.linear_epochs, batch_size=
                               config.eval.linear_batch_size, learning_rate=config.eval.linear_lr,
                               seed=config.seed)
    per_class, groups, balanced = _classwise(pred, data, config)
    result.update(linear_top1=classwise.top1(pred, data.test_labels),
                  linear_balanced_top1=balanced, linear_per_class_top1=per_class,
                  linear_groups=groups)
  if shots:
    result["lowshot"] = lowshot.lowshot(
        train_f, data.train_labels, test_f, data.test_labels, num_classes=data.num_classes,
        shots=shots, splits=config.eval.lowshot_splits, seed=config.eval.lowshot_seed,
        l2=config.eval.lowshot_l2)
  if random_encode is not None:
    r_train, r_test = feats(random_encode, data.train_images), feats(random_encode,
                                                                     data.test_images)
    r_lt = r_train[data.pretrain_indices]
    result["random_init_knn_top1"] = classwise.top1(
        _knn(r_train, data.train_labels, r_test, data, config), data.test_labels)
    result["random_init_knn_lt_top1"] = classwise.top1(
        _knn(r_lt, lt_labels, r_test, data, config), data.test_labels)
  return result


def scalars(result: dict) -> dict[str, float]:
  """The scalar entries of an evaluation result, as "eval/<name>" metrics, plus the shot-group
  means ("eval/knn_few_top1", "eval/linear_many_top1", ...) and the low-shot means
  ("eval/lowshot_1shot_top1", ...)."""
  out = {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}
  for prefix, key in (("knn", "groups"), ("linear", "linear_groups")):
    for group, acc in result.get(key, {}).items():
      if acc is not None:  # A group with no class in it.
        out[f"eval/{prefix}_{group}_top1"] = acc
  for shots, summary in result.get("lowshot", {}).items():
    out[f"eval/lowshot_{shots}shot_top1"] = summary["mean"]
  return out


def format_table(result: dict) -> str:
  rows = [("k-NN top-1 (balanced train bank)", "knn_top1", "random_init_knn_top1"),
          ("k-NN top-1 (long-tailed bank)", "knn_lt_top1", "random_init_knn_lt_top1"),
          ("linear probe top-1", "linear_top1", None),
          ("k-NN balanced accuracy", "knn_balanced_top1", None),
          ("linear probe balanced accuracy", "linear_balanced_top1", None)]
  lines = [f"{'metric':34s} {'trained':>13s} {'random init':>12s}", "-" * 61]
  for name, key, rkey in rows:
    if key not in result:  # e.g. no linear probe in the mid-training evals
      continue
    ours = result.get(key)
    rand = result.get(rkey) if rkey else None
    lines.append(f"{name:34s} {_pct(ours):>13s} {_pct(rand):>12s}")
  for name, key in (("k-NN", "groups"), ("linear", "linear_groups")):
    for group, acc in result.get(key, {}).items():
      lines.append(f"{name + ' ' + group + '-shot classes':34s} {_pct(acc):>13s}")
  for shots, summary in result.get("lowshot", {}).items():
    name = f"low-shot, {shots} img/class ({len(summary['per_split'])} splits)"
    lines.append(f"{name:34s} {_pct_std(summary['mean'], summary['std']):>13s}")
  return "\n".join(lines)


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.2f}%"


def _pct_std(mean, std) -> str:
  return f"{100 * mean:.2f}±{100 * std:.2f}%"

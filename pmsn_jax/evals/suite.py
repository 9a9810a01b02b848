"""The evaluation suite run at the end of training (and every `eval_every_steps`).

Frozen target-encoder CLS features on:
  * the balanced train split (60k for Fashion-MNIST): the k-NN bank and linear-probe train set;
  * the long-tailed pretraining subset: a second k-NN bank, more sensitive to tail classes;
  * the balanced test split: what every number is measured on.
The same k-NN for a randomly initialised encoder of the same config is reported alongside,
because random ViT/CNN features are already far above chance on small images.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from pmsn_jax.evals import classwise, features, knn, linear


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


def evaluate(encode: Callable, random_encode: Callable | None, data: EvalData, config, mesh,
             *, linear_probe: bool = True) -> dict:
  """Returns the eval.json dict (without "step")."""
  def feats(fn, images):
    return features.extract_features(fn, images, config.data,
                                     batch_size=config.eval.batch_size, mesh=mesh)

  train_f, test_f = feats(encode, data.train_images), feats(encode, data.test_images)
  lt_f, lt_labels = train_f[data.pretrain_indices], data.train_labels[data.pretrain_indices]
  knn_pred = _knn(train_f, data.train_labels, test_f, data, config)
  per_class = classwise.per_class_accuracy(knn_pred, data.test_labels, data.num_classes)
  result = {
      "knn_top1": classwise.top1(knn_pred, data.test_labels),
      "knn_lt_top1": classwise.top1(_knn(lt_f, lt_labels, test_f, data, config),
                                    data.test_labels),
      "per_class_top1": per_class,
      "per_class_classifier": "knn",
      "groups": classwise.shot_groups(per_class, data.pretrain_counts),
      "pretrain_class_counts": data.pretrain_counts,
  }
  if linear_probe:
    pred = linear.linear_probe(train_f, data.train_labels, test_f, num_classes=data.num_classes,
                               epochs=config.eval.linear_epochs, batch_size=
                               config.eval.linear_batch_size, learning_rate=config.eval.linear_lr,
                               seed=config.seed)
    result["linear_top1"] = classwise.top1(pred, data.test_labels)
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
  """The scalar entries of an evaluation result, as "eval/<name>" metrics."""
  return {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}


def format_table(result: dict) -> str:
  rows = [("k-NN top-1 (balanced train bank)", "knn_top1", "random_init_knn_top1"),
          ("k-NN top-1 (long-tailed bank)", "knn_lt_top1", "random_init_knn_lt_top1"),
          ("linear probe top-1", "linear_top1", None)]
  lines = [f"{'metric':34s} {'PMSN encoder':>13s} {'random init':>12s}", "-" * 61]
  for name, key, rkey in rows:
    ours = result.get(key)
    rand = result.get(rkey) if rkey else None
    lines.append(f"{name:34s} {_pct(ours):>13s} {_pct(rand):>12s}")
  for group, acc in result.get("groups", {}).items():
    lines.append(f"{'k-NN ' + group + '-shot classes':34s} {_pct(acc):>13s}")
  return "\n".join(lines)


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.2f}%"

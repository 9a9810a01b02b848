"""Linear probe on frozen features, following the official MSN protocol (linear_eval.py).

Classifier: LayerNorm (learnable scale and bias, eps 1e-5: torch.nn.LayerNorm's defaults, as in
MSN's LinearClassifier) -> L2-normalise -> Linear (weight ~ N(0, 0.01^2), bias 0).
Optimiser: SGD, Nesterov momentum 0.9, weight decay 0, cosine decay of the learning rate to 0 over
all steps, no warm-up, softmax cross-entropy averaged over the real rows of each mini-batch.

Data parallel, like MSN's linear_eval (DistributedDataParallel + DistributedSampler), so that
iNaturalist 2018 (437,513 x 384 train features, 8142 classes) trains on any number of devices:
the train features stay a row-sharded global jax.Array (sharding.batch_sharding: rows split over
the mesh's "data" and "fsdp" axes) and are never gathered onto one device. Each row shard
shuffles its own rows every epoch (a jax.random permutation keyed by seed, epoch and shard
index) and takes local mini-batches of batch_size // shards rows; the one collective per step is
an all-reduce of the local gradient of the summed cross-entropy and of the local count of real
rows, so every step follows the mean loss over the global batch. Parameters and optimiser state
are replicated. One jitted call runs a full epoch as a lax.scan over its steps (no per-step
Python dispatch); the last local batch of an epoch is padded and masked, so every row is seen
once per epoch. Rows of weight 0 (layout padding, rows outside the train set) are masked out.

As with DistributedSampler, a global batch takes the same number of rows from every shard, so
with mini-batches the result depends on the shard count and on which rows sit on which shard;
with full batches (batch_size >= rows) it does not, up to float summation order.

Deviation: MSN trains on augmented images (RandomResizedCrop + flip) through the frozen encoder
every epoch; here the features are precomputed once (no augmentation), which is what makes a
100-epoch probe cost seconds. Expect slightly lower numbers than the paper's protocol.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pmsn_jax import sharding
from pmsn_jax.evals import knn
from pmsn_jax.losses import l2_normalize

_LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by the official MSN LinearClassifier.
_PREDICT_CHUNK = 4096  # Bounds the [chunk, num_classes] logits (iNat18: 8142 classes).


def predict_in_chunks(predict, params, features) -> np.ndarray:
  """predict(params, [chunk, D]) -> labels, over all rows in fixed-size chunks.

  The last chunk is zero-padded, so the jitted `predict` compiles once for any row count.
  """
  num = features.shape[0]
  chunk = max(1, min(_PREDICT_CHUNK, num))
  preds = []
  for start in range(0, num, chunk):
    block = features[start:start + chunk]
    preds.append(predict(params, np.pad(block, ((0, chunk - block.shape[0]), (0, 0)))))
  return np.concatenate([np.asarray(p) for p in preds] or [np.zeros((0,), np.int32)])[:num]


def _init_params(key, dim, num_classes):
  return {
      "norm": {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))},
      "head": {"kernel": 0.01 * jax.random.normal(key, (dim, num_classes)),
               "bias": jnp.zeros((num_classes,))},
  }


def _logits(params, x):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  x = (x - mean) * jax.lax.rsqrt(var + _LN_EPS)
  x = x * params["norm"]["scale"] + params["norm"]["bias"]
  # A zero row (a masked padding row: its LayerNorm output is the bias, 0 at init) needs the
  # finite gradient l2_normalize has at 0.
  x = l2_normalize(x)
  return x @ params["head"]["kernel"] + params["head"]["bias"]


@jax.jit
def _predict(params, x):
  return jnp.argmax(_logits(params, x), axis=-1).astype(jnp.int32)


def predict(params, test_features) -> np.ndarray:
  """[M] int32 numpy predictions of a trained probe (train_probe_sharded's params)."""
  test_features = np.asarray(test_features, np.float32)
  if test_features.ndim != 2:
    raise ValueError(f"test_features must be a [M, D] array, got shape {test_features.shape}")
  return predict_in_chunks(_predict, params, test_features)


def _optimizer(learning_rate, momentum, total_steps):
  schedule = optax.cosine_decay_schedule(learning_rate, decay_steps=total_steps)
  return optax.sgd(schedule, momentum=momentum, nesterov=True)


@functools.lru_cache(maxsize=32)
def _init_fn(mesh, dim, num_classes, learning_rate, momentum, total_steps):
  """Jitted key -> (params, opt_state), replicated over `mesh`: computed on the devices, so no
  host value has to be the same on every process."""
  tx = _optimizer(learning_rate, momentum, total_steps)

  def init(key):
    params = _init_params(key, dim, num_classes)
    return params, tx.init(params)

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))


# Cached per (mesh, settings), and the optimiser is rebuilt from static hyper-parameters inside
# the trace, so every epoch of a probe and repeated probes with the same settings and shapes
# (seeds, low-shot splits) reuse one compiled epoch.
@functools.lru_cache(maxsize=32)
def _epoch_fn(mesh, local_batch, steps, learning_rate, momentum, total_steps):
  """Jitted (params, opt_state, values, labels, weights, key, epoch) -> (params, opt_state):
  one epoch of data-parallel SGD, a lax.scan of `steps` steps over each shard's own rows."""
  axes = sharding.batch_axes(mesh)
  tx = _optimizer(learning_rate, momentum, total_steps)

  def local_epoch(params, opt_state, values, labels, weights, key, epoch):
    num_local = values.shape[0]
    shard = jax.lax.axis_index(axes) if axes else 0
    key = jax.random.fold_in(jax.random.fold_in(key, epoch), shard)
    padded = steps * local_batch
    order = jnp.pad(jax.random.permutation(key, num_local), (0, padded - num_local))
    in_range = jnp.arange(padded) < num_local  # The tail of the last local batch is padding.

    def step(carry, batch):
      params, opt_state = carry
      idx, real = batch
      mask = jnp.where(real, weights[idx].astype(jnp.float32), 0.0)
      x, y = values[idx], labels[idx]
      count = jnp.sum(mask)
      if axes:
        # The gradient is taken w.r.t. a per-shard (varying) copy of the params: w.r.t. the
        # replicated params themselves, shard_map's autodiff would already psum it, and the
        # explicit psum below would count it `shards` times.
        local = jax.lax.pcast(params, axes, to="varying")
        grads, count = jax.lax.psum((jax.grad(_masked_ce_sum)(local, x, y, mask), count), axes)
      else:
        grads = jax.grad(_masked_ce_sum)(params, x, y, mask)
      return _mean_gradient_step(tx, params, opt_state, grads, count), None

    batches = (order.reshape(steps, local_batch), in_range.reshape(steps, local_batch))
    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state

  rows, replicated = P(axes or None), P()
  return jax.jit(jax.shard_map(
      local_epoch, mesh=mesh,
      in_specs=(replicated, replicated, rows, rows, rows, replicated, replicated),
      out_specs=(replicated, replicated)), donate_argnums=(0, 1))


def _masked_ce_sum(params, values, labels, mask):
  """Σ_rows mask · cross-entropy. Rows of mask 0 are zeroed, not only weighted 0: NaN features
  or out-of-range labels there would otherwise turn 0 * ce into NaN."""
  x = jnp.where(mask[:, None] > 0, values.astype(jnp.float32), 0.0)
  y = jnp.where(mask > 0, labels.astype(jnp.int32), 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y)
  return jnp.sum(ce * mask)


def _mean_gradient_step(tx, params, opt_state, grads_sum, count):
  """(params, opt_state) after one optimiser step on the mean gradient grads_sum / count. A
  batch without a real row (count 0) is skipped outright: params, momentum and the schedule's
  step count stay as they were (a zero gradient would still move the params through the
  momentum)."""
  grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads_sum)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new = (optax.apply_updates(params, updates), new_opt_state)
  return jax.tree.map(lambda n, o: jnp.where(count > 0, n, o), new, (params, opt_state))


def _check_train_args(epochs, batch_size, learning_rate):
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1, got {epochs}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")


def check_batch_size(batch_size, mesh, key="batch_size"):
  """Each row shard takes batch_size // shards rows a step: at least one. `key` names the
  setting in the error (the suite passes "eval.linear_batch_size")."""
  shards = sharding.batch_shards(mesh)
  if batch_size < shards:
    raise ValueError(f"{key}={batch_size} is smaller than the mesh's {shards} row shards "
                     f"(data x fsdp); pass {key} >= {shards}, ideally a multiple of it")


def _epoch_settings(num_rows, mesh, batch_size):
  """(local_batch, steps per epoch) for R rows split over the mesh's row shards."""
  check_batch_size(batch_size, mesh)
  shards = sharding.batch_shards(mesh)
  rows_per_shard = num_rows // shards
  local_batch = min(batch_size // shards, rows_per_shard)  # Full batch: no all-padding rows.
  return local_batch, -(-rows_per_shard // local_batch)  # Ceil: the last batch is padded.


def train_probe_sharded(values, labels, weights, *, mesh, num_classes, epochs=100,
                        batch_size=256, learning_rate=1.0, momentum=0.9, seed=0):
  """Trains the MSN linear classifier on row-sharded train features, data parallel.

  Args:
    values: [R, D] float32 jax.Array with sharding equivalent to sharding.batch_sharding(mesh);
      R a multiple of sharding.batch_shards(mesh). The row order is irrelevant.
    labels: [R] int32 jax.Array in [0, num_classes) on real rows, same sharding.
    weights: [R] float32 jax.Array of 0/1, same sharding; rows of weight 0 (padding) are ignored
      whatever their values and labels. A step whose global batch holds no row of weight 1 is
      skipped: params, momentum and the schedule's step count are left as they were.
    mesh: the mesh of the arrays; rows are split over its "data" and "fsdp" axes.
    num_classes: output classes of the linear layer.
    epochs: passes over the train set (MSN: 100).
    batch_size: global mini-batch size (MSN: 256 per GPU). Each shard takes
      batch_size // shards rows per step (capped at its row count), so the global batch is
      that times the shard count; must be >= the shard count.
    learning_rate: peak lr of the cosine schedule. MSN uses 6.4 with 256 per GPU on ImageNet-1k
      (1000 classes, 100 epochs, augmented images). Because the input to the linear layer is
      L2-normalised, large rates are stable, but on small runs (few classes, few epochs, no
      augmentation) 6.4 mostly inflates the logits; 1.0 is the default here. Pass 6.4 to
      reproduce the official recipe.
    momentum: Nesterov momentum (MSN: 0.9).
    seed: seeds the weight init and the per-shard, per-epoch shuffles; the result is
      deterministic for a fixed seed, mesh and layout on a given backend.

  Returns:
    The trained params as host numpy arrays ({"norm": {scale, bias}, "head": {kernel, bias}}).
  """
  _check_train_args(epochs, batch_size, learning_rate)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if values.ndim != 2 or values.shape[0] == 0:
    raise ValueError(f"values must be a non-empty [R, D] array, got shape {values.shape}")
  num_rows, dim = values.shape
  if labels.shape != (num_rows,) or weights.shape != (num_rows,):
    raise ValueError(f"labels {labels.shape} and weights {weights.shape} must both be "
                     f"[{num_rows}], one entry per row of values")
  shards = sharding.batch_shards(mesh)
  if num_rows % shards:
    raise ValueError(f"values has {num_rows} rows, not a multiple of the mesh's {shards} row "
                     f"shards; pad with rows of weight 0")
  row_sharding = sharding.batch_sharding(mesh)
  for name, x in (("values", values), ("labels", labels), ("weights", weights)):
    if not (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(row_sharding, x.ndim)):
      raise ValueError(f"{name} must be a jax.Array laid out as sharding.batch_sharding(mesh) "
                       f"({row_sharding.spec}); put it there with jax.device_put or "
                       f"jax.make_array_from_callback")
  local_batch, steps = _epoch_settings(num_rows, mesh, batch_size)
  settings = dict(learning_rate=float(learning_rate), momentum=float(momentum),
                  total_steps=epochs * steps)  # Hashable: lru_cache keys.

  key = np.asarray(jax.random.PRNGKey(seed))
  params, opt_state = _init_fn(mesh, dim, num_classes, **settings)(key)
  epoch_fn = _epoch_fn(mesh, local_batch, steps, **settings)
  for epoch in range(epochs):
    params, opt_state = epoch_fn(params, opt_state, values, labels, weights, key,
                                 np.int32(epoch))
  # Replicated: any local copy is the whole value, also where other processes hold devices.
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)


def layout_rows(train_features, train_labels, mesh):
  """Host [N, D] features and [N] labels -> (values, labels, weights) global arrays in
  sharding.batch_sharding(mesh), padded with weight-0 rows to a multiple of the shard count.
  Every process passes the same full arrays and supplies only its own devices' rows."""
  weights = np.ones((train_features.shape[0],), np.float32)
  return tuple(sharding.rows_from_host(x, mesh) for x in (train_features, train_labels, weights))


def linear_probe(train_features, train_labels, test_features, *, num_classes, epochs=100,
                 batch_size=256, learning_rate=1.0, momentum=0.9, seed=0, mesh=None):
  """Trains the MSN linear classifier on train features and predicts the test labels.

  Args:
    train_features: [N, D] frozen features (e.g. target-encoder CLS tokens).
    train_labels: [N] integer labels in [0, num_classes).
    test_features: [M, D] features to classify.
    num_classes, epochs, batch_size, learning_rate, momentum, seed: see train_probe_sharded.
    mesh: the devices to train on, rows split over its "data" and "fsdp" axes; default one
      device.

  Returns:
    [M] int32 numpy array of predicted test labels.
  """
  train_features, train_labels, test_features = knn.check_probe_inputs(
      train_features, train_labels, test_features, num_classes)
  _check_train_args(epochs, batch_size, learning_rate)
  if mesh is None:
    mesh = sharding.make_mesh((("data", -1),), jax.devices()[:1])
  values, labels, weights = layout_rows(train_features, train_labels, mesh)
  params = train_probe_sharded(values, labels, weights, mesh=mesh, num_classes=num_classes,
                               epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                               momentum=momentum, seed=seed)
  return predict(params, test_features)


# --- MSN's protocol: augmented images through the frozen encoder every epoch -----------------


@functools.lru_cache(maxsize=8)
def _batch_step_fn(mesh, learning_rate, momentum, total_steps):
  """Jitted (params, opt_state, features, labels, weights) -> (params, opt_state): one SGD step
  on a batch-sharded global batch of features. The parameters are replicated, so XLA reduces
  the gradient over the batch's shards (an all-reduce of D x classes)."""
  tx = _optimizer(learning_rate, momentum, total_steps)

  def step(params, opt_state, features, labels, weights):
    # A batch of padding only (the tail of a short process block) is skipped.
    grads = jax.grad(_masked_ce_sum)(params, features, labels, weights)
    return _mean_gradient_step(tx, params, opt_state, grads, jnp.sum(weights))

  return jax.jit(step, donate_argnums=(0, 1), out_shardings=NamedSharding(mesh, P()))


def train_probe_streamed(epoch_batches, *, mesh, num_classes, epochs, steps_per_epoch,
                         learning_rate, momentum=0.9, seed=0):
  """The probe of train_probe_sharded, trained on features computed batch by batch:
  epoch_batches(epoch) yields steps_per_epoch (features [G, D], labels [G], weights [G])
  global arrays laid out as sharding.batch_sharding(mesh), e.g. the frozen encoder's features
  of freshly augmented images (MSN's linear_eval.py). Returns host numpy params."""
  _check_train_args(epochs, steps_per_epoch, learning_rate)
  settings = dict(learning_rate=float(learning_rate), momentum=float(momentum),
                  total_steps=epochs * steps_per_epoch)
  step_fn = _batch_step_fn(mesh, **settings)
  params = opt_state = None
  for epoch in range(epochs):
    steps = 0
    for features, labels, weights in epoch_batches(epoch):
      if params is None:  # The feature width is known at the first batch.
        params, opt_state = _init_fn(mesh, features.shape[1], num_classes, **settings)(
            np.asarray(jax.random.PRNGKey(seed)))
      params, opt_state = step_fn(params, opt_state, features, labels, weights)
      steps += 1
    if steps != steps_per_epoch:
      raise ValueError(f"epoch {epoch} had {steps} batches, not steps_per_epoch="
                       f"{steps_per_epoch}")
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)

"""PyTorch interop (msn_reader.py, timm_writer.py, state_dicts.py, convert.py): official MSN
checkpoints in, timm weights out, and numerical parity with timm's VisionTransformer and MSN's
projection head.

The checkpoints are tiny fakes in the official layout (tests/msn_fixture.py). The measured
differences are printed (pytest -s) and tabulated in docs/interop.md.
"""

import copy
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmsn_jax import checkpoint, load_encoder, msn_reader, state_dicts, timm_writer
from pmsn_jax.models import heads, vit
from tests.subprocess_runs import ROOT

# A safety net: requirements-test.txt installs torch, timm and safetensors. msn_fixture first:
# it keeps torch from loading triton next to TensorFlow (see there).
torch = pytest.importorskip("torch")
msn_fixture = pytest.importorskip("tests.msn_fixture")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

SIZE = msn_fixture.Size()  # width 64, depth 2, 4 heads, patch 16, 224 px
TOLERANCE = 1e-4           # the bound on max |difference| of float32 CLS features


def report(check: str, difference: float) -> None:
  print(f"\nparity: {check}: max abs difference {difference:.2e}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A fake MSN checkpoint and its from-msn export: (modules, checkpoint path, export dir)."""
  root = tmp_path_factory.mktemp("msn")
  path = str(root / "msn-vit-ep600.pth.tar")
  modules = msn_fixture.write_checkpoint(path, SIZE)
  export = str(root / "export")
  lines = msn_reader.from_msn(path, export, num_heads=SIZE.num_heads)
  assert "with its projection head and 10 prototypes" in lines[0]
  return modules, path, export


def pmsn_vit(export):
  """The exported encoder as a pmsn_jax ViT module (takes normalised NHWC images)."""
  _, cfg, params = checkpoint.read_export(export)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def timm_features(model, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


def timm_twin(encoder, **kwargs):
  """timm's VisionTransformer holding the MSN encoder's weights (strict load)."""
  model = msn_fixture.vit(SIZE, **kwargs).eval()
  model.load_state_dict(encoder.state_dict(), strict=True)
  return model


def test_cls_features_match_timm_at_224(converted):
  modules, _, export = converted
  images = np.random.default_rng(0).normal(size=(4, 224, 224, 3)).astype(np.float32)
  ours = np.asarray(pmsn_vit(export)(jnp.asarray(images)))
  theirs = timm_features(timm_twin(modules["target_encoder"][0]), images)
  difference = float(np.abs(ours - theirs).max())
  report("CLS features, 224 px, pmsn_jax vs timm", difference)
  assert ours.shape == (4, SIZE.width) and difference < TOLERANCE

  # The same through load_encoder, which users call: raw pixels, normalised with the export's
  # mean/std (ImageNet's, as MSN's evaluations use).
  pixels = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3)).astype(np.uint8)
  normalised = ((pixels / 255.0 - msn_reader.MSN_MEAN) / msn_reader.MSN_STD).astype(np.float32)
  got = np.asarray(load_encoder(export)(pixels))
  np.testing.assert_allclose(got, timm_features(timm_twin(modules["target_encoder"][0]),
                                                normalised), atol=TOLERANCE, rtol=0)


def msn_interpolated_pos_embed(pos_embed, npatch: int):
  """MSN's VisionTransformer.interpolate_pos_encoding (src/deit.py): torch bicubic by
  scale_factor, no antialiasing."""
  n = pos_embed.shape[1] - 1
  dim = pos_embed.shape[-1]
  patch_pos = torch.nn.functional.interpolate(
      pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
      scale_factor=math.sqrt(npatch / n), mode="bicubic")
  return torch.cat([pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def test_cls_features_at_96_px_match_timm_and_differ_from_msn_by_its_interpolation(converted):
  """At 96 px the 14x14 position table is resized to 6x6. pmsn_jax (jax.image.resize bicubic:
  Keys a = -0.5, antialiased when shrinking) and timm's dynamic_img_size (F.interpolate bicubic,
  antialias=True: the same kernel) agree; MSN's own interpolate_pos_encoding (a = -0.75, no
  antialiasing) gives another table, hence other features (docs/interop.md)."""
  modules, _, export = converted
  encoder = modules["target_encoder"][0]
  images = np.random.default_rng(2).normal(size=(4, 96, 96, 3)).astype(np.float32)
  ours = np.asarray(pmsn_vit(export)(jnp.asarray(images)))
  theirs = timm_features(timm_twin(encoder, dynamic_img_size=True), images)
  difference = float(np.abs(ours - theirs).max())
  report("CLS features, 96 px, pmsn_jax vs timm dynamic_img_size", difference)
  assert difference < TOLERANCE

  msn = msn_fixture.vit(msn_fixture.Size(image=96)).eval()
  state = dict(encoder.state_dict(), pos_embed=msn_interpolated_pos_embed(
      encoder.pos_embed.detach(), (96 // SIZE.patch) ** 2))
  msn.load_state_dict(state, strict=True)
  msn_difference = float(np.abs(ours - timm_features(msn, images)).max())
  report("CLS features, 96 px, pmsn_jax vs MSN's interpolate_pos_encoding", msn_difference)
  assert msn_difference > 10 * TOLERANCE  # the documented difference: the resampling kernel
  # ... and none other: with MSN's table given to both, the features agree again.
  table = np.asarray(state["pos_embed"])
  ours_with_msn_table = np.asarray(pmsn_vit_with_table(export, table, 96)(jnp.asarray(images)))
  np.testing.assert_allclose(ours_with_msn_table, timm_features(msn, images), atol=TOLERANCE,
                             rtol=0)


def pmsn_vit_with_table(export, pos_embed: np.ndarray, image_size: int):
  """The exported encoder rebuilt for `image_size` with the given position table."""
  _, cfg, params = checkpoint.read_export(export)
  cfg = vit.ViTConfig(**dict(cfg.__dict__, image_size=image_size))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, dict(params, pos_embed=pos_embed))
  return nnx.merge(graphdef, state)


def test_projection_head_matches_msn_with_batchnorm_in_both_modes(converted):
  """Training (batch statistics, what pmsn_jax's head always uses) and eval (the running
  statistics converted from the checkpoint) BatchNorm. A training-mode call updates the running
  statistics, so each mode gets fresh copies."""
  modules, _, export = converted
  exported = checkpoint.read_head(export)
  x = np.random.default_rng(3).normal(size=(32, SIZE.width)).astype(np.float32)
  for mode in ("train", "eval"):
    torch_head = getattr(copy.deepcopy(modules["target_encoder"][1]), mode)()
    head = heads.ProjectionHead(SIZE.width, SIZE.hidden, SIZE.output, rngs=nnx.Rngs(0))
    # As device arrays: a training-mode call writes the statistics into host arrays in place.
    nnx.update(head, *(nnx.State(jax.tree.map(jnp.asarray, exported[k]))
                       for k in ("params", "batch_stats")))
    head.train() if mode == "train" else head.eval()
    with torch.no_grad():
      theirs = torch_head(torch.from_numpy(x)).numpy()
    difference = float(np.abs(np.asarray(head(jnp.asarray(x))) - theirs).max())
    report(f"projection head, BatchNorm {mode} mode, pmsn_jax vs MSN's fc", difference)
    assert difference < TOLERANCE
  np.testing.assert_array_equal(exported["prototypes"], modules["prototypes"].numpy())


def test_from_msn_then_to_timm_equals_from_msn_in_pmsn_jax(converted, tmp_path):
  modules, _, export = converted
  out = str(tmp_path / "vit.safetensors")
  lines = timm_writer.to_timm(export, out)
  code = next(line.split("model = ", 1)[1] for line in lines if "model = " in line)
  assert code.startswith("timm.models.vision_transformer.VisionTransformer(img_size=224, ")
  model = eval(code, {"timm": timm}).eval()  # the printed model, loaded as printed
  model.load_state_dict(safetensors_torch.load_file(out), strict=True)
  images = np.random.default_rng(4).normal(size=(4, 224, 224, 3)).astype(np.float32)
  difference = float(np.abs(timm_features(model, images)
                            - np.asarray(pmsn_vit(export)(jnp.asarray(images)))).max())
  report("CLS features, 224 px, from-msn -> to-timm -> timm vs from-msn -> pmsn_jax",
         difference)
  assert difference < TOLERANCE
  # Conversion is transposes and reshapes only: the MSN tensors come back bit for bit.
  original = modules["target_encoder"][0].state_dict()
  for key, value in safetensors_torch.load_file(out).items():
    assert torch.equal(value, original[key]), key

  head_file = timm_writer.head_path(out)
  assert head_file == str(tmp_path / "vit.head.safetensors")
  tensors = safetensors_torch.load_file(head_file)
  prototypes = tensors.pop("prototypes")
  head = msn_fixture.msn_head(SIZE.width, SIZE.hidden, SIZE.output)
  head.load_state_dict(tensors, strict=True)
  for key, value in head.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      assert torch.equal(value, modules["target_encoder"][1].state_dict()[key]), key
  assert torch.equal(prototypes, modules["prototypes"])


def test_a_training_export_goes_to_timm_without_a_head(tmp_path):
  """The demo's encoder (1 channel, 28 px, patch 7; no timm name): the printed class loads it
  strictly and gives pmsn_jax's features; a training export has no head to write."""
  cfg = vit.ViTConfig(width=32, depth=2, num_heads=2, patch_size=7, image_size=28, channels=1)
  encoder = vit.ViT(cfg, rngs=nnx.Rngs(7))
  checkpoint.export_encoder(str(tmp_path / "export"), nnx.state(encoder), cfg, (0.286,),
                            (0.353,))
  out = str(tmp_path / "demo.safetensors")
  lines = timm_writer.to_timm(str(tmp_path / "export"), out)
  assert any("no projection head or prototypes" in line for line in lines)
  assert not os.path.exists(timm_writer.head_path(out))
  code = next(line.split("model = ", 1)[1] for line in lines if "model = " in line)
  assert "in_chans=1" in code and "patch_size=7" in code
  model = eval(code, {"timm": timm}).eval()
  model.load_state_dict(safetensors_torch.load_file(out), strict=True)
  images = np.random.default_rng(8).normal(size=(3, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(timm_features(model, images),
                             np.asarray(encoder(jnp.asarray(images))), atol=TOLERANCE, rtol=0)


def test_size_errors_name_the_variant_to_pass():
  from configs import common
  base = vit.ViTConfig(width=768, depth=12, num_heads=12, patch_size=16, image_size=224)
  with pytest.raises(ValueError, match=r"^embed dim 768 in the checkpoint, 384 in the config: "
                                       r"the checkpoint is a ViT-B/16, pass "
                                       r"--config\.model\.variant=B/16$"):
    msn_reader.check_against_config(base, common.get_base_config())
  large7 = vit.ViTConfig(width=1024, depth=24, num_heads=16, patch_size=7, image_size=224)
  config = common.get_base_config()
  config.model.variant = "L/16"
  with pytest.raises(ValueError, match=r"^patch size 7 in the checkpoint, 16 in the config: "
                                       r"the checkpoint is a ViT-L/7"):
    msn_reader.check_against_config(large7, config)


def test_the_layout_mappings_invert_each_other_and_accept_unscanned_blocks():
  cfg = vit.ViTConfig(width=32, depth=3, num_heads=2, patch_size=4, image_size=16)
  model = vit.ViT(cfg, rngs=nnx.Rngs(5))
  stacked = {k: v for k, v in jax_to_numpy(nnx.state(model).to_pure_dict()).items()}
  state = state_dicts.params_to_timm(stacked, cfg)
  assert list(state) == state_dicts.timm_keys(cfg)
  back = state_dicts.timm_to_params(state, cfg)
  for a, b in zip(leaves(back), leaves(stacked)):
    np.testing.assert_array_equal(a, b)
  unscanned = dict(stacked, blocks={i: {layer: {k: v[i] for k, v in p.items()}
                                        for layer, p in stacked["blocks"].items()}
                                    for i in range(cfg.depth)})
  for key, value in state_dicts.params_to_timm(unscanned, cfg).items():
    np.testing.assert_array_equal(value, state[key])


def jax_to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def leaves(tree):
  return jax.tree.leaves(tree)


@pytest.mark.parametrize("name", sorted(set(timm_writer.TIMM_NAMES.values())))
def test_the_named_timm_models_have_pmsn_jax_architectures(name):
  """timm_model_code prints these names: each must be pmsn_jax's ViT at 224 px (built on the
  meta device: no memory for ViT-H's weights)."""
  (width, depth, num_heads, patch), = [k for k, v in timm_writer.TIMM_NAMES.items() if v == name]
  with torch.device("meta"):
    model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
  cfg = vit.ViTConfig(width=width, depth=depth, num_heads=num_heads, patch_size=patch,
                      image_size=224)
  assert list(model.state_dict()) == state_dicts.timm_keys(cfg)
  assert model.patch_embed.proj.weight.shape == (width, 3, patch, patch)
  assert model.pos_embed.shape == (1, 1 + cfg.grid ** 2, width)
  block = model.blocks[0]
  assert block.attn.num_heads == num_heads and block.norm1.eps == model.norm.eps == 1e-6
  assert block.mlp.fc1.weight.shape == (4 * width, width) and block.attn.qkv.bias is not None
  assert isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "none"
  assert model.global_pool == "token" and not model.no_embed_class
  assert isinstance(model.norm_pre, torch.nn.Identity)
  assert isinstance(model.fc_norm, torch.nn.Identity)
  assert timm_writer.timm_model_code(cfg).startswith(f'timm.create_model("{name}"')


# --------------------------------------------------------------- safe loading, errors

class Payload:
  def __reduce__(self):
    return (os.system, ("echo owned",))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capfd):
  path = tmp_path / "evil.pth.tar"
  torch.save({"encoder": {"module.pos_embed": torch.zeros(1)}, "x": Payload()}, path)
  with pytest.raises(ValueError, match=r"holds code in its pickle \(it would call "
                                       r"(posix|os)\.system\)") as error:
    msn_reader.read_msn_checkpoint(path)
  assert "\n" not in str(error.value)
  assert "owned" not in capfd.readouterr().out


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"", b"PK\x03\x04garbage"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, content):
  path = tmp_path / "x.pth.tar"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint") as error:
    msn_reader.read_msn_checkpoint(path)
  assert "\n" not in str(error.value)


def test_a_checkpoint_without_msn_encoders_is_named(tmp_path):
  path = tmp_path / "model.pth"
  torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
  with pytest.raises(ValueError, match=r"is not an MSN checkpoint: it holds a dict with keys "
                                       r"\['epoch', 'state_dict'\]"):
    msn_reader.read_msn_checkpoint(path)
  with pytest.raises(FileNotFoundError, match="not found"):
    msn_reader.read_msn_checkpoint(tmp_path / "nowhere.pth.tar")


def test_a_checkpoint_of_another_size_is_named_against_the_config(converted, tmp_path):
  from configs import common
  _, path, _ = converted
  config = common.get_base_config()  # ViT-S/16: embed dim 384
  with pytest.raises(ValueError, match=r"^embed dim 64 in .*\['target_encoder'\], 384 in the "
                                       r"config: pass --config\.model\.width=64 "
                                       r"--config\.model\.depth=2"):
    msn_reader.from_msn(path, str(tmp_path / "out"), config=config)
  config.model.update(variant="mu/16", width=SIZE.width, depth=SIZE.depth)
  with pytest.raises(ValueError, match=r"projection head hidden dim 48 in .*, 2048 "
                                       r"in the config: pass --config.model.hidden_dim=48"):
    msn_reader.from_msn(path, str(tmp_path / "out"), config=config)
  config.model.update(hidden_dim=SIZE.hidden, output_dim=SIZE.output)
  with pytest.raises(ValueError, match=r"prototypes 10 in .*, 1024 in the config"):
    msn_reader.from_msn(path, str(tmp_path / "out"), config=config)
  config.model.num_prototypes = SIZE.prototypes
  config.data.image_size = 96
  with pytest.raises(ValueError, match=r"position table of 14x14 patches \(224 px\) in .*, "
                                       r"6x6 \(96 px\) in the config"):
    msn_reader.from_msn(path, str(tmp_path / "out"), config=config)
  config.data.image_size = 224
  lines = msn_reader.from_msn(path, str(tmp_path / "out"), which="encoder", config=config)
  assert "the encoder of" in lines[0]


def test_an_official_width_keeps_its_official_heads(tmp_path):
  """No tensor holds the number of heads: for an official width (every MSN model) it is the
  official one, so a config with other heads is a size error, not a silently other model."""
  from configs import common
  size = msn_fixture.Size(width=384, depth=1, num_heads=6, image=32, hidden=16, output=8,
                          prototypes=4)
  path = str(tmp_path / "small.pth.tar")
  msn_fixture.write_checkpoint(path, size, target=False)
  config = common.get_base_config()
  config.model.update(depth=1, num_heads=8, hidden_dim=16, output_dim=8, num_prototypes=4)
  config.data.image_size = 32
  with pytest.raises(ValueError, match=r"^attention heads 6 in .*\['encoder'\], 8 in the config: "
                                       r"pass --config\.model\.num_heads=6$"):
    msn_reader.from_msn(path, str(tmp_path / "out"), which="encoder", config=config)
  config.model.num_heads = 6
  lines = msn_reader.from_msn(path, str(tmp_path / "out"), which="encoder", config=config)
  assert "6 heads" in lines[0]
  with pytest.raises(ValueError, match=r"has no 'target_encoder' state dict \(it has "
                                       r"\['encoder'\]\): pass --which=encoder"):
    msn_reader.from_msn(path, str(tmp_path / "out"))


def test_cli_converts_both_ways_and_errors_are_one_line(converted, tmp_path):
  _, path, _ = converted
  env = dict(os.environ, XLA_FLAGS="")

  def convert(*args):
    return subprocess.run([sys.executable, "-m", "pmsn_jax.convert", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)

  export, out = tmp_path / "export", tmp_path / "vit.safetensors"
  proc = convert("from-msn", f"--checkpoint={path}", f"--out={export}", "--num_heads=4")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((export / "model_config.json").read_text())["source"]["epoch"] == 600
  proc = convert("to-timm", f"--export={export}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "strict=True" in proc.stdout and out.exists() and (tmp_path / "vit.head.safetensors"
                                                             ).exists()
  (tmp_path / "text.pth.tar").write_text("hello")
  proc = convert("from-msn", f"--checkpoint={tmp_path / 'text.pth.tar'}", f"--out={export}")
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert len(errors) == 1 and "is not a PyTorch checkpoint" in errors[0]


def test_importing_pmsn_jax_never_imports_torch():
  code = ("import sys, pmsn_jax, pmsn_jax.checkpoint, pmsn_jax.msn_reader, pmsn_jax.timm_writer, "
          "pmsn_jax.state_dicts, pmsn_jax.convert, pmsn_jax.warm_start, pmsn_jax.validation\n"
          "print(sorted(m for m in ('torch', 'timm', 'safetensors') if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, XLA_FLAGS=""))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]"

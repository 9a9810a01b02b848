"""Tests of pmsn_jax.data.catalog: the iNat 2018 JSON and class-folder readers, exact on
synthetic trees (inat_fixture), host sharding, and each error a user can hit (one line that
names the path)."""
import json
import os

import numpy as np
import pytest

import inat_fixture
from pmsn_jax.data import catalog

# Long-tailed, with zero-count classes in the middle and at the largest category id.
COUNTS = [7, 0, 4, 1, 2, 3, 0]
VAL_PER_CLASS = 2


@pytest.fixture(scope="module")
def inat(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("inat"))
  tree = inat_fixture.make_inat_tree(root, COUNTS, val_per_class=VAL_PER_CLASS,
                                     corrupt=[("train", 0), ("train", 5), ("val", 3)])
  return root, tree


def assert_rows(files, rows):
  np.testing.assert_array_equal(files.paths, rows["paths"])
  np.testing.assert_array_equal(files.labels, rows["labels"])
  assert files.labels.dtype == np.int32


def edited_json(inat, tmp_path, edit):
  """A copy of the fixture's train2018.json, changed by `edit`, alone in tmp_path."""
  with open(inat[1]["train"]["json"]) as f:
    data = edit(json.load(f))
  with open(tmp_path / "train2018.json", "w") as f:
    json.dump(data, f)
  return str(tmp_path), str(tmp_path / "train2018.json")


def assert_one_line(error, *fragments):
  message = str(error.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message


def _set(keys, value):
  """An edit of the JSON: data[keys[0]][keys[1]]... = value."""
  def edit(data):
    _parent(data, keys)[keys[-1]] = value
    return data
  return edit


def _pop(keys):
  """An edit of the JSON that removes data[keys[0]][keys[1]]...."""
  def edit(data):
    _parent(data, keys).pop(keys[-1])
    return data
  return edit


def _parent(data, keys):
  for key in keys[:-1]:
    data = data[key]
  return data


def _without_categories(ids):
  def edit(data):
    data["categories"] = [c for c in data["categories"] if c["id"] not in ids]
    return data
  return edit


# iNaturalist 2018 JSON.


def test_inat_train_exact_labels_counts_and_supercategories(inat):
  root, tree = inat
  files = catalog.read_inat_json(root, "train")
  assert_rows(files, tree["train"])
  np.testing.assert_array_equal(files.supercategories, tree["train"]["supercategories"])
  assert files.num_classes == len(COUNTS)
  np.testing.assert_array_equal(files.class_counts(), COUNTS)
  assert files.class_names == tree["class_names"]
  assert files.supercategory_names == tree["supercategory_names"]
  assert list(files.supercategory_names) == sorted(inat_fixture.SUPERCATEGORIES)
  # Each row's supercategory is its class's, by name.
  for path, super_index in zip(files.paths, files.supercategories):
    assert path.split("/")[-3] == files.supercategory_names[super_index]


def test_inat_rows_in_image_id_order_whatever_the_json_order(inat):
  root, tree = inat
  with open(tree["train"]["json"]) as f:
    images = json.load(f)["images"]
  json_ids = [image["id"] for image in images]
  assert json_ids != sorted(json_ids)  # The fixture shuffles, so this test means something.
  files = catalog.read_inat_json(root, "train")
  id_of = {os.path.join(root, image["file_name"]): image["id"] for image in images}
  assert [id_of[p] for p in files.paths] == sorted(json_ids)


@pytest.mark.parametrize("split", ["validation", "val", "test"])
def test_inat_eval_splits_read_val2018(inat, split):
  root, tree = inat
  files = catalog.read_inat_json(root, split)
  assert_rows(files, tree["val"])
  np.testing.assert_array_equal(files.supercategories, tree["val"]["supercategories"])
  np.testing.assert_array_equal(files.class_counts(),
                                [VAL_PER_CLASS if c else 0 for c in COUNTS])
  assert files.num_classes == len(COUNTS)  # Train and val share one label space.


def test_inat_never_opens_images(inat, tmp_path):
  """Only the JSON is read: a tree whose images are all missing still catalogs (the pipeline
  skips and counts missing files), so 437k files are never stat'ed."""
  root, _ = edited_json(inat, tmp_path, lambda data: data)
  files = catalog.read_inat_json(root, "train")
  np.testing.assert_array_equal(files.labels, inat[1]["train"]["labels"])
  assert not any(os.path.exists(p) for p in files.paths)


def test_inat_category_id_gaps_and_trailing_classes(inat, tmp_path):
  root, _ = edited_json(inat, tmp_path, _without_categories({1}))
  files = catalog.read_inat_json(root, "train")
  assert files.num_classes == len(COUNTS) and files.class_names[1] == ""
  np.testing.assert_array_equal(files.class_counts(), COUNTS)
  # num_classes comes from the largest category id, not the largest label seen.
  root, _ = edited_json(inat, tmp_path, _without_categories({6}))
  files = catalog.read_inat_json(root, "train")
  assert files.num_classes == len(COUNTS) - 1


def test_inat_corrupt_files_are_cataloged(inat):
  root, tree = inat
  files = catalog.read_inat_json(root, "train")
  assert set(tree["train"]["corrupt"]) <= set(files.paths) and len(tree["train"]["corrupt"]) == 2


@pytest.mark.parametrize("edit, fragments", [
    (lambda d: [d], ["not an iNaturalist 2018 annotation file"]),
    (lambda d: {k: v for k, v in d.items() if k != "categories"}, ["missing key 'categories'"]),
    (_pop(["images", 0, "file_name"]), ["missing key 'file_name'"]),
    (_set(["images", 0, "id"], "seven"), ["'id' must be integers"]),
    (_set(["categories"], []), ["'categories' must be a non-empty list"]),
    (_set(["categories", 0, "id"], -1), ["non-negative"]),
    (_pop(["annotations", -1]), ["has 0 annotations"]),
    (lambda d: (d["annotations"].append(dict(d["annotations"][0], id=1)), d)[1],
     ["has 2 annotations"]),
    (lambda d: (d["images"].append(dict(d["images"][0], file_name="x.jpg")), d)[1],
     ["appears twice"]),
    (lambda d: (d["annotations"].append({"id": 5, "image_id": -3, "category_id": 0}), d)[1],
     ["annotation 5", "image id -3", "not in 'images'"]),
    (_set(["annotations", 0, "category_id"], 99), ["category_id 99", "not in 'categories'"]),
    (_without_categories({0}), ["category_id 0", "not in 'categories'"]),
    (lambda d: dict(d, images=[], annotations=[]), ["no images"]),
], ids=["not_an_object", "no_categories_key", "no_file_name", "string_id", "empty_categories",
        "negative_category", "image_without_annotation", "two_annotations", "repeated_image_id",
        "unknown_image", "category_out_of_range", "category_missing", "empty_split"])
def test_inat_bad_json_is_a_one_line_error_naming_the_file(inat, tmp_path, edit, fragments):
  root, path = edited_json(inat, tmp_path, edit)
  with pytest.raises(ValueError) as error:
    catalog.read_inat_json(root, "train")
  assert_one_line(error, path, "re-extract train2018.json.tar.gz", *fragments)


def test_inat_unparseable_json(tmp_path):
  (tmp_path / "val2018.json").write_text('{"images": [')
  with pytest.raises(ValueError) as error:
    catalog.read_inat_json(str(tmp_path), "val")
  assert_one_line(error, str(tmp_path / "val2018.json"), "not valid JSON")
  (tmp_path / "val2018.json").write_bytes(b"\xff\xfe\x00garbage")
  with pytest.raises(ValueError) as error:
    catalog.read_inat_json(str(tmp_path), "val")
  assert_one_line(error, str(tmp_path / "val2018.json"), "not valid JSON")


def test_inat_missing_root_and_files(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as error:
    catalog.read_inat_json(missing, "train")
  assert_one_line(error, missing, "train2018.json.tar.gz")
  with pytest.raises(FileNotFoundError) as error:
    catalog.read_inat_json(str(tmp_path), "validation")
  assert_one_line(error, str(tmp_path / "val2018.json"), "iNaturalist 2018")


@pytest.mark.parametrize("split", ["test2018", "eval", "Train"])
def test_inat_unknown_split(tmp_path, split):
  with pytest.raises(ValueError) as error:
    catalog.read_inat_json(str(tmp_path), split)
  assert_one_line(error, repr(split), "test2018.json has no labels", "'val'")


# Sharding and subsets.


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shard_rows_disjoint_covering_balanced(count):
  for num_rows in range(9):
    shards = [catalog.shard_rows(num_rows, i, count) for i in range(count)]
    rows = np.concatenate(shards)
    assert sorted(rows.tolist()) == list(range(num_rows))  # Disjoint and covering.
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_rows_rejects_bad_index():
  for index, count in [(2, 2), (-1, 2), (0, 0)]:
    with pytest.raises(ValueError, match="shard index"):
      catalog.shard_rows(5, index, count)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_image_files_shard_by_host(inat, count):
  files = catalog.read_inat_json(inat[0], "train")
  shards = [files.shard(i, count) for i in range(count)]
  paths = np.concatenate([s.paths for s in shards])
  assert len(set(paths.tolist())) == len(paths) == len(files)
  assert set(paths.tolist()) == set(files.paths.tolist())
  row_of = {p: i for i, p in enumerate(files.paths)}
  for shard in shards:
    rows = [row_of[p] for p in shard.paths]
    np.testing.assert_array_equal(shard.labels, files.labels[rows])
    np.testing.assert_array_equal(shard.supercategories, files.supercategories[rows])
    assert (shard.num_classes, shard.class_names, shard.supercategory_names) == (
        files.num_classes, files.class_names, files.supercategory_names)


def test_subset_keeps_supercategories(inat):
  files = catalog.read_inat_json(inat[0], "train")
  rows = np.array([5, 0, 2])
  sub = files.subset(rows)
  np.testing.assert_array_equal(sub.paths, files.paths[rows])
  np.testing.assert_array_equal(sub.supercategories, files.supercategories[rows])
  assert sub.supercategory_names == files.supercategory_names
  assert sub.num_classes == files.num_classes and len(sub.class_counts()) == files.num_classes


# Class folders.


def test_folder_split_layout(tmp_path):
  root = str(tmp_path)
  train = inat_fixture.make_folder_tree(root, [3, 0, 2, 5], "train", corrupt=[1])
  val = inat_fixture.make_folder_tree(root, [1, 2], "val", seed=1,
                                      class_names=["class_000", "class_003"])
  files = catalog.read_folder(root, "train")
  assert_rows(files, train)
  assert files.class_names == train["class_names"] and files.supercategories is None
  np.testing.assert_array_equal(files.class_counts(), [3, 0, 2, 5])  # Empty folder: class 1.
  # val lacks two classes' folders, yet labels its classes as train does.
  files = catalog.read_folder(root, "val")
  np.testing.assert_array_equal(files.paths, val["paths"])
  np.testing.assert_array_equal(files.labels, [0, 3, 3])
  assert files.num_classes == 4 and files.class_names == train["class_names"]
  with pytest.raises(FileNotFoundError) as error:
    catalog.read_folder(root, "test")
  assert_one_line(error, os.path.join(root, "test"), "<class>/<image>")


def test_folder_flat_layout_is_train_only(tmp_path):
  root = str(tmp_path)
  tree = inat_fixture.make_folder_tree(root, [2, 0, 4], class_names=["ant", "bee", "cat"])
  files = catalog.read_folder(root, "train")
  assert_rows(files, tree)
  assert files.class_names == ("ant", "bee", "cat")
  np.testing.assert_array_equal(files.class_counts(), [2, 0, 4])
  for split in ("val", "test"):
    with pytest.raises(FileNotFoundError) as error:
      catalog.read_folder(root, split)
    assert_one_line(error, os.path.join(root, split), f"{root}/<class>/<image>")


def test_folder_extensions_hidden_and_nested_files(tmp_path):
  names = ["a.GIF", "b.bmp", "c.Jpeg", "d.png", "e.webp", "f.txt", ".g.jpg", "h"]
  os.makedirs(tmp_path / "train" / "only" / "sub")
  for name in names + ["sub/i.jpg"]:
    (tmp_path / "train" / "only" / name).write_bytes(b"never decoded here")
  os.makedirs(tmp_path / "train" / ".hidden_class")
  (tmp_path / "train" / ".hidden_class" / "j.jpg").write_bytes(b"")
  files = catalog.read_folder(str(tmp_path), "train")
  assert [os.path.basename(p) for p in files.paths] == ["a.GIF", "b.bmp", "c.Jpeg", "d.png"]
  assert files.class_names == ("only",)


def test_folder_errors(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as error:
    catalog.read_folder(missing, "train")
  assert_one_line(error, missing, "<class>/<image>")

  empty = tmp_path / "empty"
  os.makedirs(empty / ".git")
  (empty / "notes.txt").write_text("")
  with pytest.raises(ValueError) as error:
    catalog.read_folder(str(empty), "train")
  assert_one_line(error, str(empty), "no class folders")

  no_images = tmp_path / "no_images"
  for name in ("cat", "dog"):
    os.makedirs(no_images / "train" / name)
    (no_images / "train" / name / "README.txt").write_text("")
  with pytest.raises(ValueError) as error:
    catalog.read_folder(str(no_images), "train")
  assert_one_line(error, str(no_images / "train"), "no .jpg/", "2 classes")

  split_like = tmp_path / "split_like"
  os.makedirs(split_like / "val" / "cat")
  with pytest.raises(ValueError) as error:
    catalog.read_folder(str(split_like), "train")
  assert_one_line(error, str(split_like / "train"), "['val']")


# The fixture itself: real, non-square images where promised, garbage where asked.


def test_fixture_images_decode_or_are_corrupt(inat, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  Already imported by the fixture.

  rows = inat[1]["train"]
  folder = inat_fixture.make_folder_tree(str(tmp_path), [2, 2], corrupt=[0, 3], sizes=(3, 9))
  for path, (height, width) in zip(list(rows["paths"]) + list(folder["paths"]),
                                   rows["sizes"] + folder["sizes"]):
    data = tf.io.read_file(path)
    if path in rows["corrupt"] + folder["corrupt"]:
      with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(data, channels=3)
    else:
      assert height != width
      assert tf.io.decode_image(data, channels=3).shape == (height, width, 3)
  assert all(3 <= min(s) and max(s) <= 9 for s in folder["sizes"])

"""The real UCSD COVID-CT (../shared/data/covid19_ct, or $DSN_SAAL_COVID19_CT): official split."""

import json
from collections import Counter

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dsn_saal_jax.data import builders, input_pipeline
from dsn_saal_jax.data.builders import duplicates

tfds.disable_progress_bar()

# (split, class) -> (official count, files named in that upstream list).
EXPECTED = {
    ("train", "covid"): (191, ["2020.01.24.919183-p27-132.png", "2020.02.10.20021584-p6-52%0.png"]),
    ("train", "non_covid"): (234, ["14.png", "44.png"]),
    ("validation", "covid"): (60, ["2020.03.13.20035212-p23-155.png"]),
    ("validation", "non_covid"): (58, ["23.png", "412.png"]),
    ("test", "covid"): (98, ["2020.03.22.20040782-p25-1542.png"]),
    ("test", "non_covid"): (105, ["112.png", "177.png"]),
}
FOLDER = {"covid": "CT_COVID", "non_covid": "CT_NonCOVID"}


@pytest.fixture(scope="module")
def builder(covid19_ct_tfds):
  return builders.Covid19Ct(data_dir=covid19_ct_tfds, config="original")  # built by conftest


def test_official_split_counts_and_named_labels(builder):
  names = builder.info.features["label"].names
  assert names == ["non_covid", "covid"]  # 0 = non_covid, 1 = covid
  for split in ("train", "validation", "test"):
    examples = {ex["id"].decode(): ex for ex in builder.as_data_source(split)}
    counts = Counter(names[ex["label"]] for ex in examples.values())
    for cls in ("covid", "non_covid"):
      expected_count, files = EXPECTED[split, cls]
      assert counts[cls] == expected_count, (split, cls)
      for name in files:
        ex = examples[f"{FOLDER[cls]}/{name}"]
        assert names[ex["label"]] == cls
        assert ex["image"].ndim == 3 and ex["image"].shape[2] == 1 and ex["image"].max() > 0


def test_pipeline_k_n_and_imbalance_on_real_data(builder, covid19_ct_tfds):
  del builder  # built; create_dataset must reuse it (manual_dir defaults to the shared copy)
  config = ml_collections.ConfigDict(dict(
      dataset="covid19_ct", data_dir=covid19_ct_tfds, manual_dir="", image_size=64, channels=3,
      covid_fraction=1.0, seed=0, batch_size=32, eval_batch_size=64, lung_mask=False))
  ds = input_pipeline.create_dataset(config, process_index=0, process_count=1, local_device_count=1)
  np.testing.assert_array_equal(ds.info.class_counts, [234, 191])
  assert ds.info.num_eval == {"validation": 118, "test": 203}
  batch = next(ds.train_iter())
  assert batch["image"].shape == (1, 32, 64, 64, 3)
  config.covid_fraction = 0.1
  ds = input_pipeline.create_dataset(config, process_index=0, process_count=1, local_device_count=1)
  np.testing.assert_array_equal(ds.info.class_counts, [234, round(0.1 * 191)])


def test_duplicates_report_finds_the_rescaled_copy_across_train_and_test(builder):
  """The duplicates.json the build wrote (docs/design.md, "Duplicates across splits"): no identical slices; one
  near group across splits, a non-COVID training slice that is a COVID test slice at another size (a person
  looked); the other near groups are neighbouring slices of one scan, within a split and a class."""
  report = json.loads(duplicates.report_path(builder).read_text())
  assert report["format"] == duplicates.FORMAT and report["exact"]["groups"] == []
  near = report["near"]["groups"]
  assert [[(m["split"], m["id"], m["label"]) for m in g["members"]] for g in near if g["cross_split"]] == [
      [("train", "CT_NonCOVID/71%0.jpg", "non_covid"), ("test", "CT_COVID/kjr-21-e24-p5-29.png", "covid")]]
  assert report["near"]["label_conflicts"] == 1 and len(near) == 3
  assert all(len({(m["split"], m["label"]) for m in g["members"]}) == 1 for g in near if not g["cross_split"])
